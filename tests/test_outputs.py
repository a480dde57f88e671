"""No output option of any command writes into a store, over a run's file or inside the images the
command reads (issue #32): every command x every output option x such a path is refused in one line
before anything is written, and the store, the run and the images stay byte-identical."""

import json
import os
from pathlib import Path

import pytest

from conftest import cli, make_image
from zsd.cli import OUTPUT_PARAMS, cli as group


def tree(*roots):
    """Every file under `roots` with its bytes: what a refused command must leave as it was."""
    return {str(p): p.read_bytes() for r in roots for p in sorted(Path(r).rglob("*")) if p.is_file()}


@pytest.fixture
def places(store, image_folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "student.json").write_text("{}")  # refused before any command would read it
    (run / "student.safetensors").write_bytes(b"weights")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx")
    options = tmp_path / "options.json"
    options.write_text("{}")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("")
    return {"store": store, "run": run, "imgs": image_folder, "model": model, "options": options,
            "prompts": prompts, "new": tmp_path / "new"}


def commands(p):
    """Per command, its arguments with each output option's value as "{OUT}", and whether it reads
    the images of `imgs` (given, or recorded in a store it reads)."""
    s, reads = p["store"], True
    return [
        (["info", s, "--json", "{OUT}"], reads),
        (["verify", s, "--json", "{OUT}"], reads),
        (["coverage", "--train", s, "--test", s, "--json", "{OUT}"], reads),
        (["coverage", "--train", s, "--test", s, "--plot", "{OUT}"], reads),
        (["cache-teacher", p["imgs"], "--out", p["new"] / "s.zarr", "--json", "{OUT}"], reads),
        (["cache-teacher", p["imgs"], "--out", "{OUT}"], reads),
        (["train", "--targets", s, "--student", "resnet10t", "--out", p["new"] / "r", "--json", "{OUT}"], reads),
        (["train", "--targets", s, "--student", "resnet10t", "--out", "{OUT}"], reads),
        (["export", p["run"], "--out", "{OUT}", "--check-images", p["imgs"]], reads),
        (["export", p["run"], "--out", p["new"] / "x.onnx", "--check-images", p["imgs"], "--json", "{OUT}"], reads),
        (["eval", s, "--out-dir", "{OUT}"], reads),
        (["calibrate", s, "--student", p["run"], "--json", "{OUT}"], reads),
        (["calibrate", s, "--student", p["run"], "--plot", "{OUT}"], reads),
        (["robustness", s, "--out", "{OUT}"], reads),
        (["predict", p["model"], p["imgs"], "--json", "{OUT}"], reads),
        (["spurious", p["imgs"], "--out", "{OUT}"], reads),
        (["options", "pets", "--model", "m", "--out", "{OUT}"], False),
        (["prompts", "--options", p["options"], "--out", "{OUT}"], False),
        (["synth", p["prompts"], "--out", "{OUT}"], False),
        (["quickstart", "--out", "{OUT}"], False),
    ]


def test_the_table_covers_every_output_option_of_every_command(places):
    covered = {(args[0], args[args.index("{OUT}") - 1]) for args, _ in commands(places)}
    every = {(name, o.opts[0]) for name, cmd in group.commands.items() for o in cmd.params
             if o.name in OUTPUT_PARAMS}
    assert covered == every


def test_no_output_goes_into_a_store_over_a_run_file_or_into_the_images_read(places, capsys):
    store, run, imgs = map(Path, (places["store"], places["run"], places["imgs"]))
    targets = {"inside a store": [store / "zarr.json", store / "emb" / "c" / "0" / "0" / "0", store / "status",
                                  store / "new.json"],
               "a run's file": [run / "student.json", run / "log.jsonl"],
               "inside the images": [imgs / "cat" / "cat_0.png", imgs / "cat", imgs / "report.json"]}
    before = tree(store, run, imgs)
    tried = 0
    for args, reads in commands(places):
        for what, paths in targets.items():
            if what == "inside the images" and not reads:
                continue
            for target in paths:
                argv = [target if a == "{OUT}" else a for a in args]
                code, _, err = cli(argv, capsys)
                lines = [line for line in err.splitlines() if line.strip()]
                assert code != 0 and len(lines) == 1 and lines[0].startswith("zsd: error: "), (argv, err)
                assert "Traceback" not in err
                tried += 1
    assert tree(store, run, imgs) == before
    assert not places["new"].exists()  # no store or run was begun elsewhere either
    assert tried > 100


def test_train_takes_no_store_or_image_folder_as_its_run_folder(store, image_folder, tmp_path, capsys):
    photos = tmp_path / "photos"  # images no store records
    make_image(photos / "a.jpg", 0)
    for out, why in ((store, "is the store"), (image_folder, "an input of this command"),
                     (image_folder / "cat", "inside"), (photos, "no zsd run folder")):
        before = tree(out)
        code, _, err = cli(["train", "--targets", store, "--student", "resnet10t", "--out", out], capsys)
        assert code == 1 and why in err and len(err.strip().splitlines()) == 1, err
        assert tree(out) == before  # no lock, checkpoint or log either
    empty = tmp_path / "empty"
    empty.mkdir()
    from zsd.errors import check_outputs

    check_outputs([empty], flag="--out", may_be="run")  # a new or empty folder is a run folder to be
    (empty / "log.jsonl").write_text("")
    (empty / "notes.txt").write_text("mine")
    check_outputs([empty], flag="--out", may_be="run")  # an earlier run's folder, to resume


def test_reports_beside_a_store_a_run_and_in_a_runs_eval_folder_are_fine(store, tmp_path, capsys):
    code, _, err = cli(["info", store, "--json", tmp_path / "info.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "info.json").read_text())["rows"] == 12
    run = tmp_path / "run"
    run.mkdir()
    (run / "student.json").write_text("{}")
    code, _, err = cli(["info", store, "--json", run / "eval" / "info.json"], capsys)  # as the quickstart does
    assert code == 0 and os.path.isfile(run / "eval" / "info.json"), err
