import json

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from zsd.cli import main
from zsd.errors import ZsdError
from zsd.sources import scan_sources
from zsd.spurious import COLOURS, class_features, derangement, make_spurious


def class_counts(folder):
    scan = scan_sources([str(folder)])
    return scan.classnames, np.bincount(scan.labels).tolist()


def test_derangement_has_no_fixed_point():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 37):
        for _ in range(20):
            p = derangement(n, rng)
            assert sorted(p) == list(range(n)) and (p != np.arange(n)).all()
    with pytest.raises(ZsdError, match="at least 2 classes"):
        derangement(1, rng)


def test_class_features_distinct_colours_first():
    for n in (2, 10):  # up to 10 classes the colour alone tells every class apart
        f = class_features([f"c{i}" for i in range(n)], "shapes", seed=3)
        assert len({x["colour"] for x in f}) == n
    f = class_features([f"c{i}" for i in range(50)], "shapes", seed=3)
    assert len({(x["shape"], x["colour"]) for x in f}) == 50
    assert all(x["rgb"] == list(COLOURS[x["colour"]]) for x in f)
    assert f == class_features([f"c{i}" for i in range(50)], "shapes", seed=3)  # fixed by the seed
    assert f != class_features([f"c{i}" for i in range(50)], "shapes", seed=4)
    b = class_features([f"c{i}" for i in range(10)], "background", seed=0)
    assert len({x["colour"] for x in b}) == 10 and "shape" not in b[0]
    with pytest.raises(ZsdError, match="51 classes but only 50"):
        class_features([f"c{i}" for i in range(51)], "shapes", seed=0)
    with pytest.raises(ZsdError, match="11 classes but only 10"):
        class_features([f"c{i}" for i in range(11)], "background", seed=0)


def test_shapes_variant(image_folder, tmp_path):
    out = tmp_path / "sp"
    record = make_spurious(str(image_folder), str(out), mode="shapes", seed=3, log=lambda m: None)
    assert json.loads((out / "spurious.json").read_text()) == json.loads(json.dumps(record))
    classes, counts = class_counts(image_folder)
    for split in ("train", "shuffled"):
        assert class_counts(out / split) == (classes, counts)  # labels and counts preserved
    shuffled = record["shuffled_map"]
    assert sorted(shuffled.values()) == sorted(classes) and all(shuffled[c] != c for c in classes)
    features = record["features"]
    assert len({(f["shape"], f["colour"]) for f in features.values()}) == len(classes)
    boxes = set()
    for name, entry in record["images"].items():
        original = np.array(Image.open(next(image_folder.glob(str(name).rsplit(".", 1)[0] + ".*"))).convert("RGB"))
        for split, feature_class in (("train", entry["class"]), ("shuffled", shuffled[entry["class"]])):
            assert entry[split]["feature_class"] == feature_class
            img = np.array(Image.open(out / split / name))
            assert img.shape == original.shape
            x0, y0, x1, y1 = entry[split]["box"]
            assert img[(y0 + y1) // 2, (x0 + x1) // 2].tolist() == features[feature_class]["rgb"]
            inside = np.zeros(img.shape[:2], bool)
            inside[y0:y1 + 1, x0:x1 + 1] = True
            assert np.array_equal(img[~inside], original[~inside])  # nothing drawn outside the box
            boxes.add(tuple(entry[split]["box"]))
    assert len(boxes) > len(record["images"]) // 2  # positions and sizes vary per image

    again = make_spurious(str(image_folder), str(tmp_path / "sp2"), mode="shapes", seed=3, log=lambda m: None)
    assert again["features"] == features and again["shuffled_map"] == shuffled
    assert all((out / s / n).read_bytes() == (tmp_path / "sp2" / s / n).read_bytes()
               for n in record["images"] for s in ("train", "shuffled"))


def test_background_border_and_masks(image_folder, tmp_path):
    record = make_spurious(str(image_folder), str(tmp_path / "bg"), mode="background", log=lambda m: None)
    colours = {c: f["rgb"] for c, f in record["features"].items()}
    assert len({tuple(v) for v in colours.values()}) == len(colours)
    for name, entry in record["images"].items():
        img = np.array(Image.open(tmp_path / "bg" / "shuffled" / name))
        band = entry["shuffled"]["border"]
        want = colours[record["shuffled_map"][entry["class"]]]
        assert (img[:band] == want).all() and (img[:, -band:] == want).all()
        assert not (img[band:-band, band:-band] == want).all(axis=-1).all()

    masks = tmp_path / "masks"
    for p in image_folder.rglob("*.*"):
        w, h = Image.open(p).size
        m = np.zeros((h, w), np.uint8)
        m[h // 4:3 * h // 4, w // 4:3 * w // 4] = 255
        target = masks / p.relative_to(image_folder).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(target)
    record = make_spurious(str(image_folder), str(tmp_path / "bgm"), mode="background", masks=str(masks),
                           log=lambda m: None)
    name, entry = next(iter(record["images"].items()))
    img = np.array(Image.open(tmp_path / "bgm" / "train" / name))
    fg = np.array(Image.open(masks / name)) > 0
    original = np.array(Image.open(next(image_folder.glob(name.rsplit(".", 1)[0] + ".*"))).convert("RGB"))
    assert (img[~fg] == colours[entry["class"]]).all() and np.array_equal(img[fg], original[fg])


def test_bad_input_is_one_line(tmp_path, image_folder, capsys):
    flat = tmp_path / "flat"
    make_image(flat / "a.png", 0)
    one = tmp_path / "one" / "cat"
    make_image(one / "a.png", 0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [([str(flat), "--out", str(tmp_path / "o1")], "unlabelled"),
             ([str(tmp_path / "one"), "--out", str(tmp_path / "o2")], "at least 2 classes"),
             ([str(image_folder), "--out", str(tmp_path / "full")], "not empty"),
             ([str(image_folder), "--out", str(tmp_path / "o3"), "--masks", str(flat)], "only applies"),
             ([str(image_folder), "--out", str(tmp_path / "o4"), "--mode", "background", "--masks", str(flat)],
              "no readable foreground mask")]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["spurious", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and err[0].startswith("zsd: error:") and message in err[0], err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert not list(tmp_path.glob(".o*"))  # no half-written temporary folder left behind
