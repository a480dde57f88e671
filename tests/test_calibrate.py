"""zsd calibrate: the Clopper-Pearson bound, the guarantee over many draws, the CLI end to end, predict's abstention."""

import json

import numpy as np
import pytest
from conftest import cli
from scipy.stats import beta, binom
from student_helpers import make_student

from zsd.calibrate import restrict_options
from zsd.guarantee import _planned, calibrate_arrays, certify, compute_score, cp_upper, fit_combined, min_count
from zsd.errors import ZsdError


def test_clopper_pearson_bound_equals_the_beta_quantile_and_the_binomial_tail():
    for k, n, delta in [(0, 12, 0.1), (3, 50, 0.05), (10, 400, 0.1), (0, 45, 0.1), (7, 7, 0.05)]:
        want = 1.0 if k == n else beta.ppf(1 - delta, k + 1, n - k)
        assert cp_upper(k, n, delta) == pytest.approx(want, rel=1e-12)
        if k < n:  # the defining property, independently: P(Binomial(n, bound) <= k) = delta
            assert binom.cdf(k, n, cp_upper(k, n, delta)) == pytest.approx(delta, rel=1e-6)
    assert cp_upper(0, 12, 0.1) == pytest.approx(1 - 0.1 ** (1 / 12))  # the 0.17
    assert cp_upper(0, 12, 0.1) > 0.17
    m = min_count(0.05, 0.1)  # the first count at which no disagreement passes alpha
    assert cp_upper(0, m, 0.1) <= 0.05 < cp_upper(0, m - 1, 0.1)


def synthetic(rng, n, k=5, strength=6.0):
    """Student cosines whose top-1 margin predicts agreement with the teacher through a logistic link."""
    pred = rng.integers(0, k, n)
    conf = rng.random(n)
    cos = rng.normal(0, 0.01, (n, k))
    cos[np.arange(n), pred] += 0.05 + 0.2 * conf
    agree = rng.random(n) < 1 / (1 + np.exp(-strength * (conf - 0.2)))
    teacher = np.where(agree, pred, (pred + 1 + rng.integers(0, k - 1, n)) % k)
    return cos, teacher


@pytest.mark.parametrize("score", ["margin", "auto"])
def test_the_guarantee_holds_over_many_draws_at_the_promised_rate(score):
    """300 calibration sets of 600 photos: the population disagreement among the accepted exceeds alpha in
    at most about delta of them (auto: the score and the start planned on a third, tested on the rest)."""
    alpha, delta, draws = 0.05, 0.1, 300
    rng = np.random.default_rng(1)
    big_cos, big_teacher = synthetic(rng, 100_000)  # the population the guarantee speaks of
    big_loss = big_cos.argmax(1) != big_teacher
    fixed = {name: compute_score({"name": name}, big_cos) for name in ("margin", "msp")}  # scored once
    violations, accepted = 0, []
    for d in range(draws):
        cos, teacher = synthetic(rng, 600)
        agree = cos.argmax(1) == teacher
        if score == "auto":
            spec, r, _ = _planned(cos, agree, (~agree).astype(float), alpha, delta, seed=d)
        else:
            spec = {"name": "margin"}
            r = certify(compute_score(spec, cos), ~agree, alpha, delta)
        accepted.append(r["accepted_fraction"])
        if r["certified"]:
            big = fixed[spec["name"]] if spec["name"] in fixed else compute_score(spec, big_cos)
            violations += big_loss[big >= r["threshold"]].mean() > alpha
    # violations ~ Binomial(draws, <= delta): more than its 99.9 % quantile would refute the guarantee
    assert violations <= binom.ppf(0.999, draws, delta), violations
    assert np.mean(accepted) > 0.1  # and it accepts something: a procedure that never accepts could not fail


def test_an_uncertifiable_student_accepts_nothing():
    rng = np.random.default_rng(0)
    cos, _ = synthetic(rng, 2000)
    teacher = rng.integers(0, 5, 2000)  # the scores say nothing about agreement (20 %)
    for score in ["margin", "msp", "combined", "auto"]:
        report = calibrate_arrays(range(2000), cos, teacher, None, list("abcde"), score=score, holdout=0.5)
        assert report["result"]["certified"] is False and report["result"]["threshold"] == np.inf
        assert not any(r["accepted"] for r in report["records"]) and report["holdout"]["accepted"] == 0


def test_too_few_photos_is_one_line_naming_the_minimum():
    rng = np.random.default_rng(0)
    cos, teacher = synthetic(rng, 60)
    with pytest.raises(ZsdError, match=r"at least 59 are needed") as e:  # 0.05, 0.05: (0.95)^59 <= 0.05
        calibrate_arrays(range(60), cos, teacher, None, list("abcde"), alpha=0.05, delta=0.05, score="margin")
    assert "\n" not in str(e.value) and min_count(0.05, 0.05) == 59
    with pytest.raises(ZsdError, match="--risk error needs labelled photos"):
        calibrate_arrays(range(60), cos, teacher, None, list("abcde"), risk="error", holdout=0.0)


def test_a_class_the_teacher_never_predicts_is_left_out_of_what_to_generate_next():
    """Grouped by the teacher's top-1, a class no photo falls in has no accepted fraction (the getting-started
    walk's 16 photos hit this): it is listed with n 0 and not ranked among the classes to generate next."""
    rng = np.random.default_rng(0)
    cos, teacher = synthetic(rng, 200)
    teacher = np.where(teacher == 4, 0, teacher)  # the teacher never predicts "e"
    report = calibrate_arrays(range(200), cos, teacher, None, list("abcde"), alpha=0.2, delta=0.1, score="margin",
                              holdout=0.0, next_k=5)
    rows = {r["class"]: r for r in report["per_class"]["classes"]}
    assert rows["e"]["n"] == 0 and rows["e"]["accepted_fraction"] is None
    assert sorted(report["next_to_generate"]) == list("abcd")


def test_certify_stops_at_the_first_failure_and_starts_past_a_handful():
    scores = np.arange(1000, 0, -1, dtype=float)  # photo i has the i-th highest score
    losses = np.zeros(1000)
    losses[150] = losses[151] = losses[152] = losses[153] = 1  # a burst of disagreement ...
    losses[600:] = 1  # ... and a bad tail
    r = certify(scores, losses, 0.05, 0.1, tolerance=0.0)
    assert r["start"] == min_count(0.05, 0.1)
    assert r["certified"] and r["accepted"] < 600
    # the result is the last passing step before the first failure, each bound recomputed independently
    for s in r["steps"]:
        k = int(losses[:s["accepted"]].sum())
        assert s["bound"] == pytest.approx(beta.ppf(0.9, k + 1, s["accepted"] - k))
    assert all(s["bound"] <= 0.05 for s in r["steps"][:-1]) and r["bound"] == r["steps"][-2]["bound"]
    assert r["steps"][-1]["bound"] > 0.05


def test_combined_score_is_fitted_and_ranks_agreement():
    rng = np.random.default_rng(0)
    cos, teacher = synthetic(rng, 3000)
    agree = cos.argmax(1) == teacher
    spec = fit_combined(cos[:1000], agree[:1000])
    json.dumps(spec)  # recordable
    s = compute_score(spec, cos[1000:])
    top = np.argsort(-s)[:400]
    assert agree[1000:][top].mean() > agree[1000:].mean() + 0.1


@pytest.fixture
def run(store, tmp_path):
    make_student(tmp_path / "run", store, steps=30)
    return tmp_path / "run"


def test_cli_end_to_end_json_recomputed_and_guarantee_recorded(store, run, tmp_path, capsys):
    out, png = tmp_path / "cal.json", tmp_path / "cal.png"
    code, stdout, err = cli(["calibrate", store, "--student", run, "--classes-from", store, "--alpha", "0.5",
                             "--delta", "0.5", "--holdout", "0.25", "--score", "margin", "--json", out, "--plot", png,
                             "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not strict JSON"))
    recs = report["records"]
    assert len(recs) == 12 and {r["part"] for r in recs} == {"calibration", "holdout"}
    assert sum(r["part"] == "holdout" for r in recs) == 3
    thr = report["result"]["threshold"]  # null (strict JSON) where nothing was certified: nothing accepted
    assert all(r["accepted"] == (thr is not None and r["score"] >= thr) for r in recs)
    cal = [r for r in recs if r["part"] == "calibration"]
    acc = [r for r in cal if r["accepted"]]
    assert report["result"]["accepted"] == len(acc)
    if acc:
        assert report["result"]["risk"] == pytest.approx(np.mean([not r["agree"] for r in acc]))
    assert all(r["agree"] == (r["student"] == r["teacher"]) for r in recs)
    hold = [r for r in recs if r["part"] == "holdout" and r["accepted"]]
    assert report["holdout"]["accepted"] == len(hold)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "scores (each alone" in stdout and "per class" in stdout
    recorded = json.loads((run / "calibration.json").read_text())
    assert recorded == report["guarantee"] and recorded["score"]["name"] == "margin"
    assert recorded["classnames"] == ["cat", "dog", "fish_tank"] and recorded["n_calibration"] == 9

    code, _, err = cli(["calibrate", store, "--student", run, "--classes-from", store, "--device", "cpu"], capsys)
    assert code == 1 and "too few" in err and "at least" in err and len(err.strip().splitlines()) == 1


def test_restrict_options_keeps_only_the_classes_to_generate(tmp_path):
    src = tmp_path / "options.json"
    src.write_text(json.dumps({"classes": {"cat": {"pose": ["sitting"]}, "fish_tank": {"pose": ["lit"]},
                                           "dog": {"pose": ["running"]}}}))
    restrict_options(str(src), ["fish tank", "dog"], str(tmp_path / "next.json"))
    assert json.loads((tmp_path / "next.json").read_text()) == {"classes": {"fish_tank": {"pose": ["lit"]},
                                                                            "dog": {"pose": ["running"]}}}


def test_predict_abstains_below_the_recorded_threshold(store, run, image_folder, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from zsd.predict import predict

    model = tmp_path / "model.onnx"
    code, _, err = cli(["export", run, "--out", model, "--classes-from", store], capsys)
    assert code == 0, err
    m = onnx.load(str(model))
    entry = next(p for p in m.metadata_props if p.key == "zsd")
    meta = json.loads(entry.value)
    plain = predict(model, [image_folder])
    assert all("abstained" not in r for r in plain)
    margins = sorted(r["top"][0]["logit"] - r["top"][1]["logit"] for r in predict(model, [image_folder], top_k=2))
    threshold = (margins[5] + margins[6]) / 2 / meta["logit_scale"]  # between the 6th and 7th margin (cosines)

    def with_record(record):
        meta["calibration"] = record
        entry.value = json.dumps(meta)
        onnx.save(m, str(model))

    with_record({"score": {"name": "margin"}, "threshold": threshold, "classnames": meta["classnames"]})
    results = predict(model, [image_folder], top_k=2)
    for r in results:
        margin = (r["top"][0]["logit"] - r["top"][1]["logit"]) / meta["logit_scale"]
        assert r["abstained"] == (margin < threshold) and len(r["top"]) == 2
    assert sum(r["abstained"] for r in results) == 6
    code, out, _ = cli(["predict", model, image_folder, "--top-k", "2"], capsys)
    assert out.count("ABSTAINED") == 6
    code, out, _ = cli(["predict", model, image_folder, "--json", "-"], capsys)
    assert sum(r["abstained"] for r in json.loads(out)) == 6

    # nothing certified: every prediction abstains; other classes: nothing is claimed
    with_record({"score": {"name": "margin"}, "threshold": None, "classnames": meta["classnames"]})
    assert all(r["abstained"] for r in predict(model, [image_folder]))
    with_record({"score": {"name": "margin"}, "threshold": threshold, "classnames": ["a", "b", "c"]})
    assert all("abstained" not in r for r in predict(model, [image_folder]))


def test_the_guarantee_ships_with_the_student_and_only_for_its_weights_and_classes(store, run, image_folder, tmp_path,
                                                                                  capsys):
    """calibrate records it; eval reports selective accuracy with it; the ONNX file and the open_clip
    folder carry it; other classes or weights trained further claim nothing."""
    pytest.importorskip("onnxruntime")
    from zsd.evaluate import evaluate
    from zsd.predict import predict
    from zsd.store import open_store

    code, _, err = cli(["calibrate", store, "--student", run, "--classes-from", store, "--alpha", "0.5", "--delta",
                        "0.5", "--holdout", "0.25", "--score", "margin", "--device", "cpu"], capsys)
    assert code == 0, err
    record = json.loads((run / "calibration.json").read_text())
    # the student's own margins on the store's photos, computed independently of zsd's classifier code
    results = evaluate(store, [str(run)], classes_from=store, device="cpu", progress=False, log=lambda m: None)
    emb = open_store(results[1]["embeddings"]).embeddings(view=0).astype(np.float64)
    src = open_store(store)
    t = src.embeddings(view=0).astype(np.float64)
    labels = src.labels()
    protos = np.stack([t[labels == c].mean(0) for c in range(len(src.classnames))])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ protos.T
    top2 = np.sort(cos, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    record["threshold"] = float(np.median(margin))  # a threshold that splits the photos, whatever was certified
    (run / "calibration.json").write_text(json.dumps(record))
    want = margin >= record["threshold"]
    results = evaluate(store, [str(run)], classes_from=store, device="cpu", progress=False, log=lambda m: None)
    sel = results[1]["metrics"]["selective"]
    assert sel["n_accepted"] == want.sum() and sel["accepted_fraction"] == pytest.approx(want.mean())
    pred, tpred = cos.argmax(1), (t @ protos.T).argmax(1)
    assert sel["agreement_with_teacher"] == pytest.approx((pred[want] == tpred[want]).mean())
    assert sel["acc1"] == pytest.approx((pred[want] == labels[want]).mean())

    model = tmp_path / "m.onnx"
    code, out, err = cli(["export", run, "--out", model, "--classes-from", store], capsys)
    assert code == 0, err
    meta = json.loads(model.with_suffix(".json").read_text())
    assert meta["calibration"] == record and "guarantee goes with it" in err
    got = predict(model, [image_folder], top_k=2)
    assert sum(r["abstained"] for r in got) == (~want).sum()
    folder = tmp_path / "oc"
    code, _, err = cli(["export", run, "--format", "open_clip", "--out", folder, "--no-check"], capsys)
    assert code == 0, err
    assert json.loads((folder / "open_clip_config.json").read_text())["zsd"]["calibration"] == record
    assert "## Calibrated guarantee" in (folder / "README.md").read_text()

    # other classes (the teacher's text classifier): the ONNX file carries no guarantee, and says why
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["cat", "dog"]))
    code, out, err = cli(["export", run, "--out", tmp_path / "other.onnx", "--classes", names], capsys)
    assert code == 0, err
    assert "calibration" not in json.loads((tmp_path / "other.json").read_text())
    assert "calibrated for other classes" in err
    # a damaged record claims nothing, and eval says so
    (run / "calibration.json").write_text('{"format": "zsd-calibration/1", "thr')
    notes = []
    results = evaluate(store, [str(run)], classes_from=store, device="cpu", progress=False, log=notes.append)
    assert "selective" not in results[1]["metrics"]
    assert any("calibration.json is damaged" in n and "zsd calibrate" in n for n in notes)
    # weights trained on after calibration: nothing is claimed anywhere
    record["student_weights"] = "sha256:" + "0" * 64
    (run / "calibration.json").write_text(json.dumps(record))
    notes = []
    results = evaluate(store, [str(run)], classes_from=store, device="cpu", progress=False, log=notes.append)
    assert "selective" not in results[1]["metrics"]
    assert any("calibrated on other weights" in n for n in notes)


def test_unlabelled_photos_calibrate_the_disagreement(store, run, image_folder, tmp_path, tiny_teacher_name, capsys):
    """The paper's user has real photos without labels: agreement with the teacher needs none. Classes come
    from --classes-from (prototypes) or --classnames (the teacher's text classifier); --risk error is refused."""
    import shutil

    from zsd.cache import cache_teacher
    from zsd.calibrate import load_predictions
    from zsd.store import open_store

    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(image_folder.rglob("*.*")):
        shutil.copyfile(f, flat / f.name)
    cache_teacher([str(flat)], str(tmp_path / "u.zarr"), teacher=tiny_teacher_name, views=1, workers=0,
                  progress=False, log=lambda m: None)
    unlabelled = open_store(tmp_path / "u.zarr")
    assert not unlabelled.classnames
    p = load_predictions(str(unlabelled.path), str(run), classes_from=store, device="cpu", progress=False,
                         log=lambda m: None)
    assert p["labels"] is None and len(p["keys"]) == 12 and p["classnames"] == ["cat", "dog", "fish_tank"]
    # the teacher's top-1 against the prototypes, independently
    src = open_store(store)
    t = src.embeddings(view=0).astype(np.float64)
    protos = np.stack([t[src.labels() == c].mean(0) for c in range(3)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    order = [list(map(str, unlabelled.keys())).index(k) for k in p["keys"]]
    u = unlabelled.embeddings(view=0).astype(np.float64)[order]
    assert np.array_equal(p["teacher_pred"], (u @ protos.T).argmax(1))

    names = tmp_path / "names.json"
    names.write_text(json.dumps(["cat", "dog", "fish tank"]))
    out = tmp_path / "u.json"
    code, _, err = cli(["calibrate", str(unlabelled.path), "--student", run, "--classnames", names, "--alpha", "0.5",
                        "--delta", "0.5", "--holdout", "0.25", "--score", "margin", "--json", out, "--no-record",
                        "--device", "cpu"], capsys)
    assert code == 0, err
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 12 and all("label" not in r for r in recs)
    code, _, err = cli(["calibrate", str(unlabelled.path), "--student", run, "--classes-from", store, "--risk", "error",
                        "--device", "cpu"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "label" in err
