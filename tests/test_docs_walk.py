"""The getting-started walk, run: own photos -> cache-teacher -> train -> eval -> coverage -> calibrate -> export
-> predict, exactly the lines of docs/getting-started.md's "Your own photos, start to finish" block.

The block's lines run in order in a fresh folder (holding a link `zsd` to the package, as a checkout's root
holds the package, so its `zsd/data/...` paths resolve): shell lines with bash, `zsd` lines through the CLI in
this process (a process per command would spend most of the test importing torch). Only what makes the walk
take minutes instead of seconds is substituted, in the `zsd` lines' words, and nothing else:

- the teacher (`--teacher timm:tf_efficientnet_lite0 --pretrained pypi:...`) by the tiny random open_clip
  teacher of conftest: EfficientNet-Lite0's pass over the photos at 224 px takes a minute on two cores;
- the shipped first-stage student (`--init zsd/data/students/...`) by a fresh `mobilenetv3_small_050` at 32 px:
  it was distilled from EfficientNet-Lite0 (1280-d embeddings) and cannot learn the tiny teacher's 16-d ones;
- `--steps 150 --batch-size 32` by 3 steps of 8.

Each command must exit 0, and what it leaves is read back.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import cli
from PIL import Image

import zsd
from zsd.store import open_store, resolve_store
from zsd.student import load_student

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "getting-started.md"
HEADING = "## Your own photos, start to finish"
BREEDS = ["Abyssinian", "Bengal", "beagle", "pug"]
FEWER = {"--steps": "3", "--batch-size": "8"}


def walk_lines() -> list[str]:
    """The first fenced block after HEADING, its backslash continuations joined."""
    text = PAGE.read_text()
    assert HEADING in text, f"{PAGE.name} has no section {HEADING!r}"
    block = re.search(r"```\w*\n(.*?)```", text.split(HEADING, 1)[1], re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def substituted(words: list[str], teacher: str) -> list[str]:
    """The words of a `zsd` line with the substitutions of the module's docstring."""
    out, i = [], 0
    while i < len(words):
        w = words[i]
        if w == "--teacher":
            out += ["--teacher", teacher]
        elif w == "--init":
            out += ["--student", "mobilenetv3_small_050", "--student-res", "32"]
        elif w in FEWER:
            out += [w, FEWER[w]]
        elif w != "--pretrained":  # the tiny teacher is a local folder: no weights to name
            out.append(w)
            i += 1
            continue
        i += 2
    return out


def test_the_own_photos_walk_runs_as_written(tmp_path, monkeypatch, tiny_teacher_name, capsys):
    lines = walk_lines()
    commands = [shlex.split(line)[1] for line in lines if line.startswith("zsd ")]
    assert commands == ["cache-teacher", "cache-teacher", "train", "eval", "coverage", "calibrate", "export",
                        "predict"]
    (tmp_path / "zsd").symlink_to(Path(zsd.__file__).parent)
    monkeypatch.chdir(tmp_path)
    shell: list[str] = []
    outputs = {}
    for line in lines + ["zsd"]:  # a last bare `zsd` runs the shell lines of the end, if any
        if not line.startswith("zsd"):
            shell.append(line)
            continue
        if shell:
            done = subprocess.run(["bash", "-euc", "\n".join(shell)], capture_output=True, text=True, cwd=tmp_path)
            assert done.returncode == 0, f"{shell}: {done.stderr}"
            shell = []
        words = substituted(shlex.split(line)[1:], tiny_teacher_name)
        if not words:
            continue
        code, out, err = cli(words, capsys)
        assert code == 0, f"zsd {' '.join(words)}: {err}"
        outputs[words[0]] = out

    # the folder of "own photos": 4 classes, 6 train and 4 test photos each
    for part, n in (("train", 6), ("test", 4)):
        assert sorted(p.name for p in (tmp_path / "my_photos" / part).iterdir()) == sorted(BREEDS)
        assert all(len(list((tmp_path / "my_photos" / part / b).iterdir())) == n for b in BREEDS)
    train, test = open_store(resolve_store("my_train")), open_store(resolve_store("my_test"))
    assert (train.rows, train.views, test.rows, test.views) == (24, 4, 16, 1)
    assert sorted(train.classnames) == sorted(test.classnames) == sorted(BREEDS)
    assert train.teacher_id == test.teacher_id and "tiny_clip" in json.dumps(train.teacher)

    run = tmp_path / "runs" / "mine"
    student, config = load_student(run)
    assert config["step"] == 3 and config["student"] == "mobilenetv3_small_050"
    results = [json.loads(p.read_text()) for p in (run / "eval").glob("*.json")]
    assert sorted(r["role"] for r in results) == ["student", "teacher"]
    assert all(0 <= r["metrics"]["acc1"] <= 1 for r in results)

    coverage = json.loads((run / "coverage.json").read_text())
    assert (coverage["n_test"], coverage["n_train"], len(coverage["images"])) == (16, 24, 16)
    calibration = json.loads((run / "calibration.json").read_text())
    assert sorted(calibration["classnames"]) == sorted(BREEDS)
    for png in ("coverage.png", "calibration.png"):
        with Image.open(run / png) as im:
            assert im.format == "PNG" and im.size[0] > 100

    onnx = pytest.importorskip("onnx")
    meta = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "mine.onnx")).metadata_props}["zsd"])
    assert meta == json.loads((tmp_path / "mine.json").read_text())
    assert meta["classnames"] == train.classnames and meta["classifier"]["kind"] == "prototypes"
    assert meta["student"]["step"] == 3

    predicted = outputs["predict"].strip().splitlines()
    pugs = sorted(str(p) for p in Path("my_photos/test/pug").iterdir())
    assert sorted(line.split(": ", 1)[0] for line in predicted) == pugs
    assert all(line.rsplit(": ", 1)[1].split(" ")[0] in BREEDS for line in predicted), predicted
    # the calibration went with the export: below its threshold (none: nothing certified) predict abstains
    calibrated = meta["calibration"]
    assert calibrated["classnames"] == meta["classnames"]
    if calibrated["threshold"] is None:
        assert all("ABSTAINED" in line for line in predicted), predicted


def test_the_docs_use_only_what_a_user_has():
    """No page points at this project's data beside the checkout (../shared): a user has only the package's
    own files and those the docs show how to make."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert [p.name for p in pages if re.search(r"\.\./shared|\bshared/data\b", p.read_text())] == []
    assert [line for line in walk_lines() if "../" in line] == []


def test_inline_commands_name_options_their_command_has():
    """`zsd CMD ... --opt` in running text (not only in code blocks, which test_docs parses) names options CMD has:
    export.md once said `zsd eval ... --out` for `--out-dir`."""
    from zsd.cli import cli as group

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    wrong = []
    for page in pages:
        for span in re.findall(r"`(zsd [a-z-]+[^`]*)`", page.read_text()):
            words = span.split()
            command = group.commands.get(words[1])
            if command is None:
                wrong.append(f"{page.name}: `{span}`: no command {words[1]}")
                continue
            known = {o for p in command.params for o in [*p.opts, *p.secondary_opts]} | {"--help"}
            wrong += [f"{page.name}: `{span}`: {w}" for w in words[2:]
                      if w.startswith("--") and w.split("=")[0] not in known]
    assert wrong == []
    assert "--out RUN/eval" not in (ROOT / "docs" / "export.md").read_text()
