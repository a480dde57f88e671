"""zsd export / zsd predict on tiny students: parity, metadata read back, predict == eval, no torch in predict."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import cli
from student_helpers import make_student

from zsd.cache import cache_teacher
from zsd.classes import prototype_classifier, zero_shot_classifier
from zsd.evaluate import evaluate
from zsd.predict import predict, preprocess
from zsd.sources import load_rgb
from zsd.store import open_store
from zsd.student import load_student
from zsd.teachers import create_teacher
from zsd.templates import TEMPLATES
from zsd.views import Preprocess, normalize, render_view

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(image_folder, tmp_path, tiny_teacher_name):
    cache_teacher([str(image_folder)], str(tmp_path / "s.zarr"), teacher=tiny_teacher_name, views=1, chunk_rows=4,
                  workers=0, progress=False, log=lambda m: None)
    return open_store(tmp_path / "s.zarr")


@pytest.fixture
def run(store, tmp_path):
    make_student(tmp_path / "run", store.path, steps=30)  # trained a little: its predictions differ per image
    return tmp_path / "run"


def torch_embeddings(run, images):
    """The student on zsd's own torch preprocessing: the reference the exported model must reproduce."""
    student, config = load_student(run)
    pre = Preprocess.from_dict(config["preprocess"])
    x = torch.stack([normalize(render_view(im, 0, None, pre), pre.mean, pre.std) for im in images])
    return student.encode_images(x).numpy().astype(np.float64)


def encoded(img, fmt):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_predict_preprocessing_equals_the_torch_path():
    """Same pixels and inputs, number for number, for every resize mode, filter, size and image mode."""
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
           [(48, 40), (17, 61), (300, 7), (32, 32), (33, 35)]]
    modes = [load_rgb(encoded(rgb[0].convert(m), "PNG")) for m in ("L", "RGBA", "P")]
    modes.append(load_rgb(encoded(Image.fromarray(rng.integers(0, 65536, (30, 50), dtype=np.uint16)), "PNG")))
    modes.append(load_rgb(encoded(rgb[1].convert("CMYK"), "JPEG")))
    images = rgb + modes
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    configs = [Preprocess(32, 36, "bicubic", mean, std), Preprocess(24, 24, "bilinear", mean, std),
               Preprocess(20, 31, "nearest", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
               Preprocess(28, 20, "bicubic", mean, std),  # resize < size: the centre crop pads with zeros
               Preprocess(26, 26, "bicubic", mean, std, resize_mode="squash")]
    for pre in configs:
        for img in images:
            want = normalize(render_view(img, 0, None, pre), pre.mean, pre.std).numpy()
            got = preprocess(img, pre.to_dict())
            assert got.dtype == np.float32 and got.shape == want.shape == (3, pre.size, pre.size)
            assert np.array_equal(got, want), (pre, img.size)
    # and it can fail: another filter gives other numbers
    other = Preprocess(32, 36, "bilinear", mean, std)
    assert not np.array_equal(preprocess(rgb[0], other.to_dict()),
                              normalize(render_view(rgb[0], 0, None, configs[0]), mean, std).numpy())


def test_export_prototypes_metadata_parity_and_predict_equals_eval(store, run, image_folder, tmp_path, capsys):
    model = tmp_path / "out" / "model.onnx"
    code, out, err = cli(["export", run, "--out", model, "--classes-from", store.path, "--opset", "16"], capsys)
    assert code == 0, err
    assert "parity on 12 images" in err and "3 classes" in out

    # metadata read back with onnx, equal to model.json beside it
    m = onnx.load(str(model))
    meta = json.loads({p.key: p.value for p in m.metadata_props}["zsd"])
    assert meta == json.loads((tmp_path / "out" / "model.json").read_text())
    _, config = load_student(run)
    assert meta["classnames"] == ["cat", "dog", "fish_tank"] and meta["teacher_id"] == store.teacher_id
    assert {k: meta["preprocess"][k] for k in config["preprocess"]} == config["preprocess"]
    assert meta["preprocess"]["crop"] == "center" and "centre crop 32x32" in meta["preprocess"]["description"]
    assert meta["zsd_version"] == __import__("zsd").__version__ and meta["opset"] == 16
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [16]
    assert meta["classifier"]["kind"] == "prototypes" and meta["logit_scale"] == 100.0
    assert meta["input"]["shape"] == [1, 3, 32, 32] and meta["precision"] == "fp32"
    assert meta["parity"]["max_abs_embedding"] <= 1e-4 and meta["parity"]["top1_agreement"] == 1.0

    # predict (onnxruntime, numpy preprocessing) against an independent torch computation
    keys = list(store.keys())
    files = [image_folder / k for k in keys]
    results = predict(model, files, top_k=3)
    assert [r["image"] for r in results] == [str(f) for f in files]
    emb = np.array([r["embedding"] for r in results])
    want = torch_embeddings(run, [load_rgb(f.read_bytes()) for f in files])
    assert np.abs(emb - want).max() <= 1e-4
    z = prototype_classifier(store, store.classnames).astype(np.float64)
    logits = np.array([[t["logit"] for t in sorted(r["top"], key=lambda t: meta["classnames"].index(t["class"]))]
                       for r in results])
    np.testing.assert_allclose(logits, 100 * want @ z.T, atol=1e-3)
    probs = np.array([[t["prob"] for t in r["top"]] for r in results])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)  # top-3 of 3 classes: all of the softmax

    # ... and against `zsd eval` on the same images: its student embeddings, its prototypes
    (_, student_res) = evaluate(str(store.path), [str(run)], classes_from=str(store.path), device="cpu",
                                progress=False, log=lambda m: None)
    eval_emb = open_store(student_res["embeddings"]).embeddings(view=0).astype(np.float64)
    eval_pred = [meta["classnames"][c] for c in (eval_emb @ z.T).argmax(1)]
    assert [r["top"][0]["class"] for r in results] == eval_pred
    assert len(set(eval_pred)) > 1  # not one class for everything
    acc = np.mean([meta["classnames"].index(p) == lab for p, lab in zip(eval_pred, store.labels())])
    assert student_res["metrics"]["acc1"] == pytest.approx(acc)

    # the CLI on a folder: text lines and JSON agree with the Python function
    code, out, _ = cli(["predict", model, image_folder, "--top-k", "2", "--json", "-"], capsys)
    assert code == 0
    by_file = {r["image"]: r for r in json.loads(out)}
    assert all(by_file[str(f)]["top"][0]["class"] == p for f, p in zip(files, eval_pred))
    assert all(len(r["top"]) == 2 for r in by_file.values())
    code, out, _ = cli(["predict", model, files[0]], capsys)
    assert out.startswith(f"{files[0]}: {eval_pred[0]} ")


def test_export_text_classifier_dynamic_batch(store, run, tmp_path, tiny_teacher_name, capsys):
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["cat, kitty", "dog", "fish tank"]))  # of synonyms the first, as in eval
    model = tmp_path / "text.onnx"
    code, _, err = cli(["export", run, "--out", model, "--classes", names, "--templates", "default",
                        "--dynamic-batch", "--check-n", "5"], capsys)
    assert code == 0, err
    assert "parity on 5 images (generated)" in err
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic batch dimension
    teacher = create_teacher(tiny_teacher_name, None, "cpu")
    scale = float(teacher.model.logit_scale.detach().exp())
    meta = json.loads(model.with_suffix(".json").read_text())
    assert meta["logit_scale"] == pytest.approx(scale) and meta["classifier"]["templates"] == "default"
    assert meta["classnames"] == ["cat", "dog", "fish tank"]
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)) for i in range(7)]
    x = np.stack([preprocess(im, meta["preprocess"]) for im in images])
    emb, logits = session.run(None, {"pixels": x})  # one batch of 7
    want = torch_embeddings(run, images)
    z = zero_shot_classifier(teacher, ["cat", "dog", "fish tank"], TEMPLATES["default"], cache=False)
    assert np.abs(emb - want).max() <= 1e-4
    np.testing.assert_allclose(logits, scale * want @ z.T.astype(np.float64), atol=1e-3)
    assert [r["top"][0]["class"] for r in predict(model, images)] == \
        [["cat", "dog", "fish tank"][c] for c in (want @ z.T).argmax(1)]


def test_fp16_export_and_a_failing_parity_check(store, run, tmp_path, capsys):
    model = tmp_path / "half.onnx"
    code, _, err = cli(["export", run, "--out", model, "--classes-from", store.path, "--fp16"], capsys)
    assert code == 0, err
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)"
    meta = json.loads(model.with_suffix(".json").read_text())
    assert meta["precision"] == "fp16" and meta["input"]["dtype"] == "float16"
    assert 0 < meta["parity"]["max_abs_embedding"] <= 1e-2  # against the fp32 student: half really is half
    # the check fails the export above its tolerance, in one line, and writes nothing
    bad = tmp_path / "bad.onnx"
    code, out, err = cli(["export", run, "--out", bad, "--classes-from", store.path, "--fp16", "--tolerance", "1e-6"],
                         capsys)
    assert code == 1 and err.splitlines()[-1].startswith("zsd: error: parity check failed, nothing written")
    assert not bad.exists() and not bad.with_suffix(".json").exists() and not list(tmp_path.glob(".bad*"))


def test_predict_imports_no_torch(store, run, image_folder, tmp_path, capsys):
    model = tmp_path / "enc.onnx"
    code, out, err = cli(["export", run, "--out", model, "--check-images", image_folder], capsys)
    assert code == 0 and "encoder only" in out and "(" + str(image_folder) + ")" in err
    image = sorted(image_folder.glob("*/*"))[0]
    script = ("import json, sys\nfrom zsd.cli import main\n"
              f"main(['predict', {str(model)!r}, {str(image)!r}, '--json', '-'])\n"
              "print(json.dumps([m for m in ('torch', 'torchvision', 'timm', 'open_clip') if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    *report, modules = done.stdout.strip().splitlines()
    result, loaded = json.loads("\n".join(report)), json.loads(modules)
    assert loaded == []
    # an encoder-only model: the embedding, no classes; equal to the student's in torch
    assert "top" not in result[0]
    want = torch_embeddings(run, [load_rgb(image.read_bytes())])[0]
    assert np.abs(np.array(result[0]["embedding"]) - want).max() <= 1e-4
    # the check can fail: the same script importing zsd.export does load torch
    done = subprocess.run([sys.executable, "-c", "import sys, zsd.export; print('torch' in sys.modules)"],
                          capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ,
                                                                          "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "True"


def test_bad_input_is_one_line(store, run, tmp_path, image_folder, capsys):
    def one_line(args, match):
        code, out, err = cli(args, capsys)
        assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("zsd: error: "), err
        assert match in err, err

    empty = tmp_path / "empty_run"
    empty.mkdir()
    one_line(["export", empty, "--out", tmp_path / "m.onnx"], "holds no trained student")
    one_line(["export", run, "--out", tmp_path / "m.onnx", "--classes", tmp_path / "missing.json"],
             "cannot read --classes")
    (tmp_path / "nums.json").write_text("[1, 2]")
    one_line(["export", run, "--out", tmp_path / "m.onnx", "--classes", tmp_path / "nums.json"], "holds no class names")
    one_line(["export", run, "--out", tmp_path / "m.pt"], "name the model file *.onnx")
    one_line(["export", run, "--out", tmp_path / "m.onnx", "--classes", tmp_path / "nums.json", "--classes-from",
              store.path], "pass one of them")
    assert not list(tmp_path.glob("m.*"))

    model = tmp_path / "ok.onnx"
    assert cli(["export", run, "--out", model, "--classes-from", store.path, "--no-check"], capsys)[0] == 0
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    good = sorted(image_folder.glob("*/*"))[0]
    one_line(["predict", model, good, broken], f"{broken}: truncated or corrupt image")
    one_line(["predict", model, tmp_path / "nothing.png"], "no such file")
    other = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), str(other), dynamo=False)
    one_line(["predict", other, good], "not one `zsd export` wrote")
    one_line(["predict", broken, good], "not an ONNX model")


def test_a_run_still_training_warns_and_the_files_get_the_usual_modes(store, run, tmp_path, capsys):
    """The ONNX pair: readable by others as any file written under the umask; a held run lock gives one warning
    line, and the metadata records the step of the weights it holds."""
    import os
    import stat

    from zsd.store import folder_lock

    config = json.loads((run / "student.json").read_text())
    (run / "student.json").write_text(json.dumps({**config, "step": 20, "total_steps": 30}))
    old = os.umask(0o022)
    try:
        with folder_lock(run, wait=False, holder="`zsd train` (pid 7 on box)"):
            code, _, err = cli(["export", run, "--out", tmp_path / "m.onnx", "--check-n", "2"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: {run} is still being trained by `zsd train` (pid 7 on box): these are the weights of its "
        "checkpoint at step 20 of 30; export again when the run ends"]
    meta = json.loads((tmp_path / "m.json").read_text())
    assert (meta["student"]["step"], meta["student"]["total_steps"]) == (20, 30)
    assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("m.onnx", "m.json")} == {0o644}
    code, _, err = cli(["export", run, "--out", tmp_path / "n.onnx", "--check-n", "2"], capsys)
    assert code == 0 and "warning:" not in err
