"""The trainer on tiny stores made by the tiny teacher: views, order, resume, init, failures, CLI."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import functional as TF

from conftest import make_image
from zsd.cache import cache_teacher
from zsd.cli import main as cli_main
from zsd.loader import PixelCache, StudentInputs, TrainTargets, parse_target
from zsd.errors import ZsdError
from zsd.evaluate import student_embeddings
from zsd.store import PENDING, WRITTEN, open_store
from zsd.sources import RowReader, load_rgb
from zsd.student import Student, load_pretrained_backbone, load_student, student_preprocess
from zsd.teachers import create_teacher
from zsd.train import STATE, TrainConfig, train
from zsd.views import Preprocess, eval_box, normalize, render_view, resize_pixels

STUDENT = "test_resnet"
# The DataLoader path; test_pixel_cache_trains_bit_identically covers the pixel cache.
FAST = dict(student=STUDENT, student_res=32, batch_size=4, lr=1e-3, workers=0, device="cpu", precision="fp32",
            pixel_cache="no")


def fit(targets, run_dir, *, resume=False, stop_after=None, log=lambda m: None, **fields):
    """A quiet `train` of a small config (FAST, updated by `fields`)."""
    config = TrainConfig(list(targets), run_dir=str(run_dir), **{**FAST, **fields})
    return train(config, resume=resume, stop_after=stop_after, progress=False, log=log)


def make_store(image_folder, path, teacher, views=3):
    cache_teacher([str(image_folder)], str(path), teacher=teacher, pretrained=None, views=views, chunk_rows=4,
                  workers=0, progress=False, log=lambda m: None)
    return str(path)


@pytest.fixture
def store(image_folder, tmp_path, tiny_teacher_name):
    return make_store(image_folder, tmp_path / "s.zarr", tiny_teacher_name)


def student_pre(targets, res=32):
    """The STUDENT's transform for targets of this teacher, as the trainer makes it."""
    return student_preprocess(STUDENT, Preprocess.from_dict(targets.teacher["preprocess"]), res)


def weights(run_dir, prefix=""):
    return load_file(str(run_dir / f"{prefix}student.safetensors"))


def test_rebuilt_views_reproduce_the_cached_embeddings(store, tiny_teacher_name):
    """The pixels the trainer rebuilds for a (row, view), fed to the teacher, give the cached embedding."""
    targets = TrainTargets([store], log=lambda m: None)
    ds = StudentInputs(targets, student_pre(targets))
    teacher = create_teacher(tiny_teacher_name, None, "cpu")
    s = open_store(store)
    emb = s.embeddings()
    pre = teacher.preprocess
    params = s.view_params()
    assert (params[:, 1:, :4] != params[:, :1, :4]).any()  # augmented views really are other crops
    for view in range(s.views):
        px = torch.stack([ds.teacher_pixels(0, r, view) for r in range(s.rows)])
        z = teacher.encode_images(normalize(px, pre.mean, pre.std)).numpy()
        np.testing.assert_allclose(z, emb[:, view].astype(np.float32), atol=2e-3)
        # and the student input is those pixels at the student's resolution and normalisation
        item, x, err = ds[(0, 0, view)]
        sp = ds.student_pre
        assert err == "" and x.shape == (3, 32, 32)
        assert torch.equal(x, resize_pixels(px[0], 32, sp.interpolation))  # uint8: the trainer normalises
        assert sp.mean != pre.mean  # the student's own normalisation, not the teacher's
    # a wrong view (other crop) does not reproduce it: the check can fail
    px = torch.stack([ds.teacher_pixels(0, r, 1) for r in range(s.rows)])
    z = teacher.encode_images(normalize(px, pre.mean, pre.std)).numpy()
    assert np.abs(z - emb[:, 2].astype(np.float32)).max() > 1e-2


def test_data_order_is_a_function_of_seed_and_epoch(store):
    targets = TrainTargets([store], log=lambda m: None)
    a, b = targets.epoch_order(0, 0), targets.epoch_order(0, 0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, targets.epoch_order(0, 1))
    assert sorted(a[:, 1]) == list(range(12))  # every row once per epoch
    assert set(a[:, 2]) <= {0, 1, 2}
    streamed = TrainTargets([store], in_ram="no", shuffle_chunks=1, log=lambda m: None)
    order = streamed.epoch_order(0, 0)
    assert sorted(order[:, 1]) == list(range(12))
    # one chunk at a time: each run of 4 samples is one chunk's rows
    assert all(len({r // 4 for r in order[i:i + 4, 1]}) == 1 for i in range(0, 12, 4))
    # streamed targets are the stored ones
    emb = open_store(store).embeddings()
    np.testing.assert_array_equal(streamed.targets(order).numpy(), emb[order[:, 1], order[:, 2]].astype(np.float32))


def test_streamed_store_trains_and_resumes_identically(store, tmp_path):
    args = dict(steps=4, in_ram="no", shuffle_chunks=1)
    fit([store], tmp_path / "full", **args)
    fit([store], tmp_path / "parts", stop_after=3, **args)
    fit([store], tmp_path / "parts", resume=True, **args)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "parts")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pixel_cache_trains_bit_identically(store, image_folder, tmp_path):
    (image_folder / "cat" / "cat_0.png").write_bytes(b"not an image any more")  # row 0: skipped either way
    args = dict(steps=6, batch_size=4, losses=["l2", "contrastive-image=0.5"])
    plain = fit([store], tmp_path / "plain", **args)
    messages = []
    cached = fit([store], tmp_path / "cached", pixel_cache="yes", log=messages.append, **args)
    assert any("rendered into" in m for m in messages)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "cached")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain["skipped_images"] == cached["skipped_images"] > 0
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "log.jsonl").read_text().splitlines() if "\"loss\"" in x]
              for r in ("plain", "cached")]
    assert losses[0] == losses[1]
    # a second run (another seed) reads the rendered file instead of decoding again
    messages.clear()
    fit([store], tmp_path / "again", pixel_cache="yes", seed=1, log=messages.append, **args)
    assert not any("rendered into" in m for m in messages)
    # a damaged pixel file (truncated, as by a full disk or a copy cut short) is rendered again
    (pixels,) = (Path(os.environ["ZSD_CACHE"]) / "pixels").glob("*.npy")
    pixels.write_bytes(pixels.read_bytes()[:1000])
    messages.clear()
    fit([store], tmp_path / "repaired", pixel_cache="yes", log=messages.append, **args)
    assert any("is damaged or incomplete" in m for m in messages) and any("rendered into" in m for m in messages)
    c = weights(tmp_path / "repaired")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_loss_decreases_and_run_dir_is_complete(store, tmp_path):
    run = tmp_path / "run"
    summary = fit([store], run, steps=24, lr=3e-3, precision="bf16")
    assert summary["finished"] and summary["steps"] == 24
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 24 and sum(1 for r in log if "epoch_end" in r) == 8
    first, last = np.mean([r["loss"] for r in steps[:3]]), np.mean([r["loss"] for r in steps[-3:]])
    assert last < 0.7 * first
    r = steps[-1]
    assert set(r["dist"]) == {"mean", "p50", "p90", "max"} and r["dist"]["max"] >= r["dist"]["p90"] >= r["dist"]["p50"]
    assert r["loss"] == pytest.approx(r["terms"]["l2"]) and r["images_per_s"] > 0 and r["lr"] == 3e-3
    model, cfg = load_student(run)
    s = open_store(store)
    assert cfg["teacher_id"] == s.teacher_id and cfg["embed_dim"] == s.dim and cfg["preprocess"]["size"] == 32
    assert cfg["total_steps"] == 24 and cfg["train_config"]["lr"] == 3e-3 and (run / STATE).is_file()
    assert not list(run.glob("*.tmp"))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(store, tmp_path):
    args = dict(steps=8, losses=["l2", "contrastive-image=0.5"], save_every=3, ema_decay=0.9, ema_warmup=True)
    fit([store], tmp_path / "full", **args)
    fit([store], tmp_path / "parts", stop_after=5, **args)
    assert open_store(store) and json.loads((tmp_path / "parts/student.json").read_text())["step"] == 5
    with pytest.raises(ZsdError, match="--resume"):
        fit([store], tmp_path / "parts", **args)
    # a change that alters the run is refused, naming every such change; execution settings may change
    with pytest.raises(ZsdError) as refused:
        fit([store], tmp_path / "parts", resume=True, **{**args, "lr": 2e-3, "warmup_steps": 2, "workers": 1})
    assert str(refused.value) == (f"--resume: {tmp_path / 'parts'} is another run (lr 0.001 -> 0.002, warmup_steps 0 "
                                  "-> 2): pass its settings again, or another --out for a new run")
    fit([store], tmp_path / "parts", resume=True, **{**args, "save_every": 2})
    for prefix in ("", "ema_"):
        a, b = weights(tmp_path / "full", prefix), weights(tmp_path / "parts", prefix)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    full_log = (tmp_path / "full/log.jsonl").read_text().splitlines()
    parts_log = (tmp_path / "parts/log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in full_log if "\"loss\"" in x] == \
           [json.loads(x)["loss"] for x in parts_log if "\"loss\"" in x]
    torch.save({"step": 8, "train_args": {}}, tmp_path / "parts" / STATE)  # an older zsd's state
    with pytest.raises(ZsdError, match="written by an older zsd"):
        fit([store], tmp_path / "parts", resume=True, **args)


def test_resume_takes_the_default_precision_as_the_one_it_resolves_to(store, tmp_path):
    """A run that named bf16 (as `zsd train` did before it shared the library's default) continues
    with the default (bf16 on a CPU); fp32 is another run."""
    args = dict(steps=2, precision="bf16")
    fit([store], tmp_path / "run", stop_after=1, **args)
    with pytest.raises(ZsdError, match="precision 'bf16' -> 'fp32'"):
        fit([store], tmp_path / "run", resume=True, **{**args, "precision": "fp32"})
    assert fit([store], tmp_path / "run", resume=True, **{**args, "precision": None})["steps"] == 2


def test_ema_of_the_weights_is_saved_and_used_when_asked(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZSD_CACHE", str(tmp_path / "cache"))
    one, two = tmp_path / "one", tmp_path / "two"
    fit([store], one, steps=1, ema_decay=0.75)
    fit([store], two, steps=2, ema_decay=0.75)
    w1, w2, ema = weights(one), weights(two), weights(two, "ema_")
    # the first update copies the weights; each later one moves the EMA by 1 - decay towards them
    assert all(torch.equal(weights(one, "ema_")[k], w1[k]) for k in w1)
    for k in w2:
        torch.testing.assert_close(ema[k], 0.75 * w1[k] + 0.25 * w2[k] if w2[k].is_floating_point() else w2[k])
    assert any(not torch.equal(ema[k], w2[k]) for k in w2)
    assert json.loads((two / "ema_student.json").read_text())["train_config"]["ema_decay"] == 0.75

    # RUN_DIR:ema is that student wherever a student is taken
    model, config = load_student(f"{two}:ema")
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    cli_main(["eval", store, "--student", str(two), "--student", f"{two}:ema", "--templates", "default",
              "--device", "cpu", "--out-dir", str(tmp_path / "eval")])
    assert "two_ema" in capsys.readouterr().out
    raw, averaged = (open_store(json.loads((tmp_path / f"eval/s__{name}.json").read_text())["embeddings"])
                     for name in ("two", "two_ema"))
    assert averaged.path == two / "embeddings" / "ema_s.zarr"
    assert not np.array_equal(raw.embeddings(), averaged.embeddings())
    manual = Student(STUDENT, config["embed_dim"], 32)
    manual.load_state_dict(ema)
    pre, s = Preprocess.from_dict(config["preprocess"]), open_store(store)
    reader = RowReader(s.sources)
    x = torch.stack([normalize(render_view(load_rgb(reader.read(k, loc)), 0, None, pre), pre.mean, pre.std)
                     for k, loc in zip(s.keys(), s.locs())])
    np.testing.assert_allclose(averaged.embeddings(view=0).astype(np.float32), manual.eval().encode_images(x),
                               atol=2e-3)
    with pytest.raises(ZsdError, match="holds no EMA student .*--ema-decay"):
        load_student(f"{tmp_path / 'no_run'}:ema")


def test_student_res_is_honoured_end_to_end(store, tmp_path, monkeypatch):
    """40 px: neither the teacher's 32 nor the student's own 160, in training, student.json, --init and eval."""
    sizes = []
    real_forward = Student.forward

    def spy(self, x):
        sizes.append(tuple(x.shape[-2:]))
        return real_forward(self, x)

    monkeypatch.setattr(Student, "forward", spy)
    run, stage2 = tmp_path / "run", tmp_path / "stage2"
    fit([store], run, steps=2, student_res=40)
    assert sizes and set(sizes) == {(40, 40)}
    assert load_student(run)[1]["preprocess"]["size"] == 40
    fit([store], stage2, steps=1, student=None, student_res=None, init_from=str(run))  # the init's resolution
    assert load_student(stage2)[1]["preprocess"]["size"] == 40
    sizes.clear()
    student_embeddings(run, open_store(store), progress=False)
    assert sizes and set(sizes) == {(40, 40)}


def test_the_student_is_evaluated_on_its_training_view(store, tmp_path):
    """Teacher: open_clip, crop 1.0; student test_resnet, whose timm crop_pct is 0.95. The student's eval
    pixels of a photo are its training view-0 pixels (exactly at the teacher's resolution, within resampling
    at another: the same field of view), student.json records that transform, and a run saved with timm's crop is evaluated the same."""
    targets = TrainTargets([store], log=lambda m: None)
    reader, s = RowReader(targets.sources[0].store.sources), open_store(store)
    own_crop = timm.create_model(STUDENT).pretrained_cfg["crop_pct"]
    teacher = Preprocess.from_dict(s.teacher["preprocess"])
    assert own_crop < 1 and teacher.resize == teacher.size
    for res in (32, 24):
        run = tmp_path / f"run{res}"
        fit([store], run, steps=1, student_res=res)
        recorded = json.loads((run / "student.json").read_text())["preprocess"]
        pre = Preprocess.from_dict(load_student(run)[1]["preprocess"])
        assert recorded == pre.to_dict() and (pre.size, pre.resize) == (res, res)
        train_view = StudentInputs(targets, pre)
        timm_crop = Preprocess(res, int(res / own_crop), pre.interpolation, pre.mean, pre.std)
        for row, (key, loc) in enumerate(zip(s.keys(), s.locs())):
            img = reader.image(key, loc)
            if res == teacher.size:  # the same pixels
                seen = train_view.student_pixels((0, row, 0))
                assert torch.equal(render_view(img, 0, None, pre), seen)
                assert not torch.equal(render_view(img, 0, None, timm_crop), seen)  # the check can fail
            # at any resolution: the same field of view as the teacher's (on noise, resampling twice or
            # once differs by far more than on photos, so the region is compared, not the pixels)
            assert eval_box(*img.size, pre) == eval_box(*img.size, teacher)
            assert eval_box(*img.size, timm_crop) != eval_box(*img.size, teacher)
    # a run saved before (timm's crop in student.json) loads with the teacher's geometry
    config = json.loads((run / "student.json").read_text())
    (run / "student.json").write_text(json.dumps({**config, "preprocess": timm_crop.to_dict()}))
    assert load_student(run)[1]["preprocess"] == pre.to_dict()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store, tmp_path, monkeypatch):
    import zsd.losses

    reference = tmp_path / "ref"
    fit([store], reference, steps=2)
    calls = {"n": 0}
    real = zsd.losses.l2_loss

    def poisoned(s, t):
        calls["n"] += 1
        return real(s, t) * (float("nan") if calls["n"] == 4 else 1.0)

    monkeypatch.setitem(zsd.losses.LOSSES, "l2", zsd.losses.Loss(poisoned))
    run = tmp_path / "run"
    with pytest.raises(ZsdError, match=r"loss became nan at step 4.*last good checkpoint \(step 2\)"):
        fit([store], run, steps=6, save_every=2)
    a, b = weights(reference), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the step-2 weights, not the poisoned ones
    assert torch.load(run / STATE, weights_only=False)["step"] == 2
    assert (run / "log.jsonl").read_text().count('"loss"') == 3  # step 3 was logged, not saved
    # resuming after the crash continues from step 2; the log forgets what came after it
    monkeypatch.setitem(zsd.losses.LOSSES, "l2", zsd.losses.Loss(real))
    fit([store], run, steps=6, save_every=2, resume=True)
    logged = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines() if "\"loss\"" in x]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_two_stage_init_and_teacher_mismatch(store, image_folder, tmp_path, tiny_clip_dir):
    stage1 = tmp_path / "stage1"
    fit([store], stage1, steps=3)
    stage2 = tmp_path / "stage2"
    # the student name comes from --init; a zero-lr run keeps the init weights exactly
    args = {"student": None, "lr": 0.0}
    fit([store], stage2, steps=1, init_from=str(stage1), **args)
    a, b = weights(stage1), weights(stage2)
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k and "num_batches" not in k)
    assert json.loads((stage2 / "student.json").read_text())["train_config"]["init_from"] == str(stage1)

    # the same tiny architecture with other weights is another teacher
    other_dir = tmp_path / "other_clip"
    shutil.copytree(tiny_clip_dir, other_dir)
    from safetensors.torch import load_file as lf, save_file
    w = lf(str(other_dir / "open_clip_model.safetensors"))
    w = {k: v + 0.01 for k, v in w.items()}
    save_file(w, str(other_dir / "open_clip_model.safetensors"))
    other = make_store(image_folder, tmp_path / "other.zarr", f"local-dir:{other_dir}", views=1)
    with pytest.raises(ZsdError, match="another teacher"):
        fit([other], tmp_path / "bad", steps=1, init_from=str(stage1), **args)
    with pytest.raises(ZsdError, match="different teachers"):
        fit([store, other], tmp_path / "bad2", steps=1)


def test_student_pretrained_from_a_local_file(store, tmp_path):
    """The backbone starts from the file's timm weights, its classifier ignored; the projection stays random."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    timm_weights = timm.create_model(STUDENT, num_classes=1000).state_dict()  # with its classifier `fc`
    save_file(timm_weights, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": timm_weights}, tmp_path / "w.pth")  # a training checkpoint
    for name in ("w.safetensors", "w.pth"):
        model = Student(STUDENT, 16, 32)
        proj = model.proj.weight.clone()
        load_pretrained_backbone(model, str(tmp_path / name))
        backbone = model.backbone.state_dict()
        assert backbone.keys() == {k for k in timm_weights if not k.startswith("fc.")}
        assert all(torch.equal(v, timm_weights[k]) for k, v in backbone.items())
        assert torch.equal(model.proj.weight, proj)

    # trained with it: a zero-lr step keeps the file's weights (BatchNorm statistics aside), and the config says so
    run = tmp_path / "run"
    fit([store], run, steps=1, lr=0.0, student_pretrained=str(tmp_path / "w.safetensors"))
    trained = {k.removeprefix("backbone."): v for k, v in weights(run).items() if k.startswith("backbone.")}
    assert all(torch.equal(v, timm_weights[k]) for k, v in trained.items() if "running" not in k and "batches" not in k)
    assert load_student(run)[1]["train_config"]["student_pretrained"] == str(tmp_path / "w.safetensors")

    # other weights are one-line errors
    save_file({**timm_weights, "conv1.0.weight": torch.zeros(8, 3, 5, 5)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ZsdError, match=r"^[^\n]*conv1.0.weight is \(8, 3, 5, 5\) there and \(\d+, 3, 3, 3\) here$"):
        load_pretrained_backbone(Student(STUDENT, 16, 32), str(tmp_path / "bad.safetensors"))
    save_file(timm.create_model("test_efficientnet").state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ZsdError, match=r"^[^\n]*does not hold test_resnet backbone weights: \d+ of its tensors"):
        load_pretrained_backbone(Student(STUDENT, 16, 32), str(tmp_path / "other.safetensors"))
    with pytest.raises(ZsdError, match="--init or --student-pretrained, not both"):
        TrainConfig([store], init_from=str(run), student_pretrained="timm")


def test_student_pretrained_from_the_hub_offline_is_one_line(store, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    for spec in ("timm", "hf-hub:timm/test_resnet.r160_in1k"):
        with pytest.raises(SystemExit):
            cli_main(["train", "--targets", store, "--student", STUDENT, "--out", str(tmp_path / "run"),
                      "--steps", "1", "--batch-size", "4", "--device", "cpu", "--student-pretrained", spec])
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"zsd: error: could not download the {spec} weights of the student test_resnet "
                                  "(offline?): pass --student-pretrained FILE, a local .safetensors or .pth of its "
                                  "timm weights, instead [")


def test_pending_rows_and_unreadable_images_are_skipped(store, image_folder, tmp_path):
    s = open_store(store, mode="r+")
    st = s.status()
    st[4:8] = PENDING  # chunk 1 not written yet
    s.group["status"][:] = st
    (image_folder / "cat" / "cat_0.png").write_bytes(b"not an image any more")  # row 0
    shutil.rmtree(image_folder / "fish_tank")  # rows 8..11 gone
    messages = []
    summary = fit([store], tmp_path / "run", steps=1, batch_size=8, log=messages.append)
    assert summary["skipped_rows"] == 4
    assert any("skipping 4 of 12 rows not written (4 pending, 0 failed)" in m for m in messages)
    assert summary["skipped_images"] == 5 and summary["images"] == 3  # 8 written rows: 5 unreadable, 3 trained
    assert "5 samples skipped (unreadable images, non-finite targets)" in messages[-1]


def test_mixing_weights(store, image_folder, tmp_path, tiny_teacher_name, monkeypatch):
    assert parse_target("a.zarr=0.7") == ("a.zarr", 0.7) and parse_target("pets") == ("pets", None)
    monkeypatch.setenv("ZSD_CACHE", str(tmp_path))
    assert TrainTargets(["s=2"], log=lambda m: None).sources[0].store.path == tmp_path / "s.zarr"  # bare name
    second = make_store(image_folder, tmp_path / "b.zarr", tiny_teacher_name, views=1)
    targets = TrainTargets([f"{store}=1", f"{second}=9"], log=lambda m: None)
    counts = np.bincount(np.concatenate([targets.epoch_order(0, e)[:, 0] for e in range(30)]), minlength=2)
    assert 0.85 < counts[1] / counts.sum() < 0.95
    with pytest.raises(ZsdError, match="every"):
        TrainTargets([f"{store}=1", second])
    for bad in ("0", "-1", "inf", "nan"):  # an infinite weight would give every draw to the first store
        with pytest.raises(ZsdError, match="must be a positive number"):
            parse_target(f"a.zarr={bad}")


def test_clip_and_mp_use_cached_class_prompt_embeddings(store, tmp_path, tiny_teacher_name):
    run = tmp_path / "run"
    fit([store], run, steps=2, losses={"mp": 1.0, "clip": 0.5}, superclass="animal")
    cached = torch.load(run / "text_embeddings.pt", weights_only=True)
    assert cached["key"]["classes"] == ["cat", "dog", "fish tank"]
    teacher = create_teacher(tiny_teacher_name, None, "cpu")
    expected = teacher.classifier(["cat", "dog", "fish tank"], ["a photo of a {c}, a type of animal."])
    torch.testing.assert_close(cached["embeddings"], expected)
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if "\"loss\"" in x]
    assert set(log[0]["terms"]) == {"mp", "clip"}


def test_clip_with_class_prototypes_from_a_store(store, tmp_path, monkeypatch, capsys):
    """--class-embeddings-from: the clip/mp class embeddings are the prototypes of another labelled
    store (classes matched by name, view 0, written rows only), and the teacher is never rebuilt."""
    import zsd.classes
    import zsd.train
    from conftest import random_store, unit

    targets = open_store(store)
    rng = np.random.default_rng(0)
    names = ["Fish tank", "bird", "cat", "dog"]  # another order, another spelling, an extra class
    labels = np.array([0, 1, 2, 3, 2, 3, 0, 2, 3, 0, 2])
    emb = rng.normal(size=(len(labels), 2, targets.dim))
    protos = random_store(tmp_path / "protos.zarr", emb, labels, names, teacher=targets.teacher, failed=[4])
    attrs = dict(protos.attrs)
    protos.group.attrs["zsd"] = {**attrs, "teacher_id": targets.teacher_id}
    stored = open_store(protos.path).embeddings(view=0).astype(np.float64)  # as written (fp16)
    ok = np.arange(len(labels)) != 4
    expected = np.stack([unit(unit(stored[ok & (labels == names.index(c))]).sum(0)) for c in ("cat", "dog", "Fish tank")])

    seen = []

    class Spy(zsd.train.Criterion):
        def __init__(self, weights, text=None):
            seen.append(text)
            super().__init__(weights, text)

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was rebuilt")

    monkeypatch.setattr(zsd.train, "Criterion", Spy)
    monkeypatch.setattr(zsd.classes, "rebuild_teacher", no_teacher)
    run = tmp_path / "run"
    fit([store], run, steps=2, losses={"clip": 1.0, "mp": 0.5}, class_embeddings_from=str(protos.path))
    np.testing.assert_allclose(seen[0].numpy(), expected, atol=1e-6)
    assert load_student(run)[1]["train_config"]["class_embeddings_from"] == str(protos.path)
    assert not (run / "text_embeddings.pt").exists()
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if "\"loss\"" in x]
    assert set(log[0]["terms"]) == {"clip", "mp"} and all(np.isfinite(r["loss"]) for r in log)

    # what it cannot use ends in one line
    with pytest.raises(ZsdError, match="pass --loss clip or --loss mp"):
        fit([store], tmp_path / "a", steps=1, class_embeddings_from=str(protos.path))
    other = random_store(tmp_path / "other.zarr", emb, labels, names)  # another teacher
    with pytest.raises(ZsdError, match="prototypes need the same teacher"):
        fit([store], tmp_path / "b", steps=1, losses=["clip"], class_embeddings_from=str(other.path))
    few = random_store(tmp_path / "few.zarr", emb, np.where(labels == 3, 1, labels), names, teacher=targets.teacher)
    few.group.attrs["zsd"] = {**dict(few.attrs), "teacher_id": targets.teacher_id}
    with pytest.raises(SystemExit):
        cli_main(["train", "--targets", store, "--student", STUDENT, "--student-res", "32", "--out",
                  str(tmp_path / "c"), "--steps", "1", "--batch-size", "4", "--device", "cpu", "--loss", "clip",
                  "--class-embeddings-from", str(few.path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("zsd: error: ") and "dog" in err[-1] and "prototypes need every class" in err[-1]
    assert not (tmp_path / "c").exists()


def test_cli_train_and_one_line_errors(store, tmp_path, capsys):
    out = tmp_path / "cli_run"
    cli_main(["train", "--targets", store, "--student", STUDENT, "--student-res", "32", "--out", str(out),
              "--steps", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--loss", "l2",
              "--loss", "cosine=0.5", "--json", str(tmp_path / "summary.json")])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and load_student(out)[1]["train_config"]["losses"] == {"l2": 1.0, "cosine": 0.5}
    with pytest.raises(SystemExit):
        cli_main(["train", "--targets", store, "--student", STUDENT, "--out", str(tmp_path / "x"),
                  "--loss", "hinge", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "zsd: error: unknown loss 'hinge'; choose from l2, mse, cosine, contrastive-image, clip, mp"
    with pytest.raises(SystemExit):  # --resume with another lr and the default loss
        cli_main(["train", "--targets", store, "--student", STUDENT, "--student-res", "32", "--out", str(out),
                  "--steps", "2", "--batch-size", "4", "--device", "cpu", "--lr", "1e-3", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"zsd: error: --resume: {out} is another run (losses {{'l2': 1.0, 'cosine': 0.5}} -> "
                              "{'l2': 1.0}, lr 0.0005 -> 0.001): ")


def test_a_kill_while_saving_keeps_a_resumable_checkpoint(store, tmp_path, monkeypatch):
    import zsd.train

    args = dict(steps=6, save_every=2)
    fit([store], tmp_path / "full", **args)
    real_save = torch.save
    saves = {"n": 0}

    def killed_midway(obj, f, *a, **k):
        saves["n"] += 1
        if saves["n"] == 2:  # the state of step 4: half a file, then the process dies
            f.write(b"half a pickle")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(zsd.train.torch, "save", killed_midway)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit([store], run, **args)
    monkeypatch.setattr(zsd.train.torch, "save", real_save)
    assert torch.load(run / STATE, weights_only=False)["step"] == 2  # the last good state is intact
    assert not list(run.glob("*.tmp"))  # and the half-written one is gone
    fit([store], run, resume=True, **args)
    a, b = weights(tmp_path / "full"), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_papers_student_family_builds():
    """TinyViT (the paper's student) takes no img_size argument; the student must still build."""
    model = Student("tiny_vit_5m_224", 16, 224)
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 16)


def test_clip_and_mp_refuse_what_they_cannot_use(store, tmp_path, image_folder, tiny_teacher_name):
    # a teacher whose weights were a local file: the store records only its hash
    s = open_store(store, mode="r+")
    attrs = dict(s.attrs)
    attrs["teacher"] = {**attrs["teacher"], "model": "ViT-B-32", "weights": "sha256:" + "0" * 64}
    s.group.attrs["zsd"] = attrs
    with pytest.raises(ZsdError, match="pass --pretrained FILE"):
        fit([store], tmp_path / "a", steps=1, losses=["clip"])
    other = tmp_path / "other.bin"
    other.write_bytes(b"not the teacher")
    with pytest.raises(ZsdError, match="is not the file the targets were cached with"):
        fit([store], tmp_path / "b", steps=1, losses=["mp"], pretrained=str(other))
    # unlabelled rows (a flat folder) cannot be used by class-prompt losses
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in image_folder.rglob("*.*"):
        shutil.copy(p, flat / p.name)
    unlabelled = make_store(flat, tmp_path / "flat.zarr", tiny_teacher_name, views=1)
    with pytest.raises(ZsdError, match="need class labels|need labelled rows"):
        fit([unlabelled], tmp_path / "c", steps=1, losses=["clip"])


def eager_order(targets, seed, epoch):
    """The epoch order as zsd computed it before it was generated lazily (kept verbatim as the reference):
    every sample of the epoch laid out at once."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch, 0x5eed]))
    rows, bounds = [], []
    for src in targets.sources:
        written = np.flatnonzero(src.store.status() == WRITTEN)  # read here, not taken from the trainer
        if src.in_ram:
            rows.append(rng.permutation(written))
            bounds.append(np.arange(len(written) + 1))
        else:
            edges = np.searchsorted(written, np.arange(src.store.n_chunks + 1) * src.store.chunk_rows)
            chunks = rng.permutation(np.flatnonzero(np.diff(edges)))
            rows.append(np.concatenate([written[edges[c]:edges[c + 1]] for c in chunks]))
            bounds.append(np.concatenate([[0], np.cumsum(edges[chunks + 1] - edges[chunks])]))
    n_blocks = np.array([len(b) - 1 for b in bounds])
    if targets.sources[0].weight is None:
        first_block = np.concatenate([[0], np.cumsum(n_blocks)])
        ids = rng.permutation(first_block[-1])
        store = np.searchsorted(first_block, ids, side="right") - 1
        block = ids - first_block[store]
    else:
        p = np.array([src.weight / src.block_rows for src in targets.sources])
        store = rng.choice(len(targets.sources), size=targets.rows_per_epoch, p=p / p.sum())
        block = np.empty_like(store)
        for i, n in enumerate(n_blocks):
            mine = store == i
            block[mine] = np.arange(mine.sum()) % n
    all_bounds = np.concatenate(bounds)
    where = np.concatenate([[0], np.cumsum(n_blocks + 1)])[store] + block
    starts, lengths = all_bounds[where], all_bounds[where + 1] - all_bounds[where]
    keep = np.searchsorted(np.cumsum(lengths), targets.rows_per_epoch) + 1
    store, starts, lengths = store[:keep], starts[:keep], lengths[:keep]
    total = int(lengths.sum())
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    sample_store = np.repeat(store, lengths)
    position = np.repeat(starts, lengths) + within
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    sample_row = np.concatenate(rows)[offsets[sample_store] + position]
    window = np.repeat(np.arange(len(store)) // targets.shuffle_chunks, lengths)
    shuffled = np.lexsort((rng.random(total), window))[:targets.rows_per_epoch]
    sample_store, sample_row = sample_store[shuffled], sample_row[shuffled]
    views = np.array([src.store.views for src in targets.sources])[sample_store]
    sample_view = (rng.random(len(sample_row)) * views).astype(np.int64)
    return np.stack([sample_store, sample_row, sample_view], 1).astype(np.int64)


@pytest.mark.parametrize("in_ram,weights,shuffle", [("yes", None, 16), ("no", (0.3, 0.7), 3), ("yes", (1.0, 2.0), 16),
                                                   ("no", None, 3), ("mixed", (0.3, 0.7), 5), ("mixed", None, 16)])
def test_lazy_epoch_samples_give_the_eager_order_from_any_start(tmp_path, monkeypatch, in_ram, weights, shuffle):
    """Stores of 20,011 and 517 rows (some failed; in store a, chunk 2 all failed and chunk 3 full),
    chunks of 512, both streamed, both in RAM, or b in RAM and a streamed ("mixed"); weighted epochs
    drawn 1,000 stores at a time: the window-by-window samples from any start are the rows of the
    order computed all at once, and batches follow them."""
    from conftest import random_store, unit

    from zsd.loader import BatchPlan

    monkeypatch.setattr(TrainTargets, "WEIGHTED_PIECE", 1000)
    if in_ram == "mixed":
        monkeypatch.setattr("zsd.loader.ram_budget", lambda: 100_000)  # b's 12 KB of embeddings fit, a's 320 KB not
    rng = np.random.default_rng(0)
    paths = []
    for name, n, views in (("a", 20011, 2), ("b", 517, 3)):
        emb = unit(rng.standard_normal((n, views, 4))).astype(np.float16)
        failed = set(range(5, n, 97)) - set(range(1536, 2048)) | (set(range(1024, 1536)) if name == "a" else set())
        paths.append(str(random_store(tmp_path / f"{name}.zarr", emb, chunk_rows=512, failed=sorted(failed)).path))
    specs = paths if weights is None else [f"{p}={w}" for p, w in zip(paths, weights)]
    targets = TrainTargets(specs, in_ram="auto" if in_ram == "mixed" else in_ram, shuffle_chunks=shuffle,
                           log=lambda m: None)
    assert [src.in_ram for src in targets.sources] == {"yes": [True] * 2, "no": [False] * 2,
                                                       "mixed": [False, True]}[in_ram]
    for epoch in (0, 1):
        ref = eager_order(targets, 7, epoch)
        assert ref.shape == (targets.rows_per_epoch, 3)
        np.testing.assert_array_equal(targets.epoch_order(7, epoch), ref)
        for start in (1, 8191, 8193, 12345, targets.rows_per_epoch - 3):
            np.testing.assert_array_equal(np.concatenate(list(targets.epoch_samples(7, epoch, start))), ref[start:])
    # a plan resumed at step 37 of epoch 1 (batch 256, 2 micro-batches) yields that epoch's samples in order
    per_epoch = targets.rows_per_epoch // 256
    plan = BatchPlan(targets, 7, 256, 2, 1, 0, start=per_epoch + 37, total=per_epoch + 50)
    got = np.array([x for batch in plan for x in batch])
    np.testing.assert_array_equal(got, ref[37 * 256:(37 + len(plan) // 2) * 256])


def test_fast_decode_is_opt_in_and_reaches_the_loader(tmp_path, tiny_teacher_name, capsys):
    """By default the trainer rebuilds the teacher's pixels bit for bit (checked against torchvision's
    transforms on PIL's own decode); --fast-decode reaches the loader (its pixels and its run differ,
    and --resume names the flag)."""
    for i in range(4):  # crops of >= 2 x 32 px: --fast-decode decodes them at 1/2 or 1/4
        make_image(tmp_path / "imgs" / "a" / f"{i}.jpg", seed=i, size=(150 + 10 * i, 120))
    store = make_store(tmp_path / "imgs", tmp_path / "big.zarr", tiny_teacher_name, views=2)
    s, targets = open_store(store), TrainTargets([store], log=lambda m: None)
    pre = Preprocess.from_dict(s.teacher["preprocess"])
    exact = StudentInputs(targets, student_pre(targets))
    fast = StudentInputs(targets, student_pre(targets), fast_decode=True)
    bicubic = TF.InterpolationMode.BICUBIC
    for r, key in enumerate(s.keys()):
        img = Image.open(tmp_path / "imgs" / key).convert("RGB")
        for v, (top, left, h, w, flip) in enumerate(s.view_params()[r]):
            if v == 0:
                want = TF.center_crop(TF.resize(img, pre.resize, bicubic), pre.size)
            else:
                want = TF.resized_crop(img, int(top), int(left), int(h), int(w), [pre.size] * 2, bicubic)
                want = TF.hflip(want) if flip else want
            want = TF.pil_to_tensor(want)
            assert torch.equal(exact.teacher_pixels(0, r, v), want)
            d = (fast.teacher_pixels(0, r, v).int() - want.int()).abs()
            assert 0 < d.float().mean() < 10  # random pixels: the worst case for a reduced decode
    run = ["train", "--targets", store, "--student", STUDENT, "--student-res", "32", "--steps", "2", "--batch-size",
           "4", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--pixel-cache", "no"]
    cli_main(run + ["--out", str(tmp_path / "exact")])
    cli_main(run + ["--out", str(tmp_path / "fast"), "--fast-decode"])
    assert load_student(tmp_path / "fast")[1]["train_config"]["fast_decode"] is True
    a, b = weights(tmp_path / "exact"), weights(tmp_path / "fast")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):
        cli_main(run + ["--out", str(tmp_path / "fast"), "--steps", "3", "--resume"])
    assert "fast_decode True -> False" in capsys.readouterr().err.strip().splitlines()[-1]
    # the pixel cache renders each way into its own file, the same pixels as the loader's
    for inputs in (exact, fast):
        cache = PixelCache(targets, inputs, progress=False, log=lambda m: None)
        items = np.array([(0, r, v) for r in range(s.rows) for v in range(2)])
        assert torch.equal(torch.from_numpy(cache.pixels[cache.slots(items)]),
                           torch.stack([inputs.student_pixels(i) for i in items]))
    assert len(list((Path(os.environ["ZSD_CACHE"]) / "pixels").glob("*.npy"))) == 2
