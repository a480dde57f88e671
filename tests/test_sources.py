"""Sources see the file system as it is: any file name, any kind of entry, any grey depth."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from zsd.cache import cache_teacher
from zsd.cli import main as cli_main
from zsd.errors import ZsdError
from zsd.sources import BadImage, RowReader, encode_key, key_path, key_text, load_rgb, scan_sources
from zsd.store import FAILED, WRITTEN, create_store, open_store


def test_keys_round_trip_any_file_name(tmp_path):
    rng = np.random.default_rng(0)
    names = [b"plain.jpg", "caf\u00e9/\u732b.png".encode(), b"latin1-caf\xe9.jpg", b"\xff\xfe/\x80.png",
             b"%00 \\x41.jpg"]
    names += [bytes(rng.choice([b for b in range(1, 256) if b != ord("/")], 12).tolist()) for _ in range(50)]
    keys = [encode_key(os.fsdecode(n)) for n in names]
    assert [os.fsencode(key_path(k)) for k in keys] == names
    assert keys[:2] == ["plain.jpg", "caf\u00e9/\u732b.png"]  # UTF-8 names are their own key
    assert keys[2] == "latin1-caf\0e9.jpg" and key_text(keys[2]) == "latin1-caf\\xe9.jpg"
    # and the store holds them: Zarr writes UTF-8 only
    store = create_store(tmp_path / "k.zarr", keys=keys, labels=[-1] * len(keys), locs=[(0, 0, -1, -1)] * len(keys),
                         views=1, dim=4, teacher={}, teacher_id="x", classnames=[], sources=[], chunk_rows=8)
    assert list(open_store(store.path).keys()) == keys


def odd_folder(root):
    """A flat folder with one entry of every kind, all named like images, and one that is not."""
    good = make_image(root / "good.png", 1)
    with open(os.path.join(os.fsencode(root), b"\xff\xfeodd.png"), "wb") as f:  # not UTF-8: Latin-1 copied over
        f.write(good.read_bytes())
    os.symlink(root / "gone.png", root / "broken.jpg")
    os.symlink(root / "loop.jpg", root / "loop.jpg")
    os.mkfifo(root / "pipe.jpg")
    make_image(root / "dir.jpg" / "inside.png", 2)
    (root / "notes.txt").write_text("not an image")
    return root


def test_every_entry_named_like_an_image_is_cached_or_failed_with_its_reason(tmp_path, tiny_teacher_name, capsys):
    root = odd_folder(tmp_path / "odd")
    logged = []
    summary = cache_teacher([str(root)], str(tmp_path / "s.zarr"), teacher=tiny_teacher_name, pretrained=None,
                            views=1, chunk_rows=4, workers=0, progress=False, log=logged.append)
    store = open_store(tmp_path / "s.zarr")
    entries = [e for e in os.listdir(os.fsencode(root)) if not e.endswith(b".txt")]
    assert store.rows == len(entries) == 6 and summary["written"] + summary["failed"] == 6 and summary["complete"]
    keys, st, errors = list(store.keys()), store.status(), store.errors()
    assert sorted(os.fsencode(key_path(k)) for k in keys) == sorted(entries)
    reasons = {k: str(e) for k, e, s in zip(keys, errors, st) if s == FAILED}
    assert reasons == {"broken.jpg": f"broken symlink (to {root / 'gone.png'})", "loop.jpg": "symlink loop",
                       "pipe.jpg": "not a regular file (a FIFO)", "dir.jpg": "not a regular file (a directory)"}
    # the non-UTF-8 name is cached like any file: the same bytes as good.png give the same embedding
    odd, good = keys.index("\0ff\0feodd.png"), keys.index("good.png")
    assert st[odd] == st[good] == WRITTEN
    emb = store.embeddings()
    np.testing.assert_array_equal(emb[odd], emb[good])
    assert np.linalg.norm(emb[good].astype(np.float32)) > 0.99
    assert any("left out 1 entries not named like an image" in m and "notes.txt" in m for m in logged)
    capsys.readouterr()
    cli_main(["info", str(tmp_path / "s.zarr")])
    assert "failed    pipe.jpg: not a regular file (a FIFO)" in capsys.readouterr().out


def test_folder_rows_keep_rglob_order_and_class_trees_show_odd_entries(tmp_path):
    """Stores made before every entry became a row must scan to the same keys (resume compares them)."""
    root = tmp_path / "tree"
    for rel in ["b/z.jpg", "b/a b.png", "b/a.b/c.jpg", "b/a/c.jpg", "b/a/b/d.png", "a/x.JPG", "a/1.tif", "a/.h.jpg"]:
        make_image(root / rel, len(rel))
    old = [p.relative_to(root).as_posix() for c in ("a", "b") for p in sorted((root / c).rglob("*"))
           if p.suffix.lower() in (".jpg", ".png", ".tif") and p.is_file()]
    assert scan_sources([str(root)], log=lambda m: None).keys == old
    make_image(root / "b" / "odd.png" / "in.png", 7)  # a directory named like an image, inside a class
    (root / "loose.jpg").write_bytes(b"")  # outside every class folder
    logged = []
    scan = scan_sources([str(root)], log=logged.append)
    assert "b/odd.png" in scan.keys and "b/odd.png/in.png" in scan.keys and len(scan) == len(old) + 2
    assert scan.classnames == ["a", "b"] and any("1 entries outside the class folders" in m for m in logged)
    reader = RowReader(scan.descs)
    i = scan.keys.index("b/odd.png")
    with pytest.raises(BadImage, match="a directory"):
        reader.image(scan.keys[i], scan.locs[i])


def tiff(array, mode):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="TIFF")
    return buf.getvalue()


def test_deep_grey_images_are_scaled_by_the_documented_rule():
    grey = lambda data: np.asarray(load_rgb(data))[..., 0]  # noqa: E731
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_array_equal(grey(tiff(ramp, "F")), np.rint(ramp * 255).astype(np.uint8))
    assert grey(tiff(ramp, "F")).max() == 255  # not all black
    for bad in (ramp * 2, ramp - 0.5):
        with pytest.raises(BadImage, match="float image with values outside 0..1"):
            load_rgb(tiff(bad, "F"))
    assert grey(tiff(np.full((8, 8), 200, np.int32), "I"))[0, 0] == 200  # 8-bit values in 32 bits
    assert grey(tiff(np.full((8, 8), 40000, np.int32), "I"))[0, 0] == 40000 >> 8  # 16-bit values
    with pytest.raises(BadImage, match="outside 0..65535"):
        load_rgb(tiff(np.full((8, 8), 70000, np.int32), "I"))
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(buf, format="PNG")  # a dark 16-bit image stays dark
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16" and grey(buf.getvalue())[0, 0] == 0


def test_missing_shards_are_warned_before_no_images(tmp_path, capsys, tiny_teacher_name):
    logged = []
    with pytest.raises(ZsdError, match="no images found"):
        scan_sources([str(tmp_path / "{000..002}.tar")], log=logged.append)
    assert logged == [f"warning: shard {tmp_path / f'00{i}.tar'} is missing" for i in range(3)]
    with pytest.raises(SystemExit):
        cli_main(["cache-teacher", str(tmp_path / "{0..1}.tar"), "--out", str(tmp_path / "s.zarr"),
                  "--teacher", tiny_teacher_name, "--device", "cpu"])
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: shard {tmp_path / '0.tar'} is missing", f"warning: shard {tmp_path / '1.tar'} is missing",
                   f"zsd: error: no images found in {tmp_path / '{0..1}.tar'}"]


def test_a_store_with_escaped_keys_resumes(tmp_path, tiny_teacher_name):
    """Resume and append compare the scan's keys with the store's: escaped keys must match again."""
    root = odd_folder(tmp_path / "odd")
    kw = dict(teacher=tiny_teacher_name, pretrained=None, views=1, chunk_rows=4, workers=0, progress=False,
              log=lambda m: None)
    first = cache_teacher([str(root)], str(tmp_path / "s.zarr"), **kw)
    again = cache_teacher([str(root)], str(tmp_path / "s.zarr"), **kw)
    assert first["processed"] == 6 and again["processed"] == 0 and again["complete"]
