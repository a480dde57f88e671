"""zsd export --format open_clip: the folder open_clip loads, checked against zsd, and its way back into zsd eval."""

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import cli, make_image
from safetensors.torch import load_file

from zsd.cache import cache_teacher
from zsd.classes import zero_shot_classifier
from zsd.evaluate import evaluate, student_embeddings
from zsd.sources import RowReader
from zsd.store import open_store
from zsd.student import load_student
from zsd.teachers import create_teacher
from zsd.templates import resolve_templates
from zsd.train import TrainConfig, train


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_name):
    root = tmp_path_factory.mktemp("oc")
    for c, name in enumerate(["cat", "dog", "fish_tank"]):
        for i in range(4):
            make_image(root / "imgs" / name / f"{name}_{i}.jpg", seed=10 * c + i, size=(40 + 4 * i, 36 + 3 * c))
    cache_teacher([str(root / "imgs")], str(root / "s.zarr"), teacher=tiny_teacher_name, views=2, chunk_rows=4,
                  workers=0, progress=False, log=lambda m: None)
    return open_store(root / "s.zarr")


def fit(store, run_dir, student, res=None):
    """res None: the student's own resolution (a CPU run's default would be 64 px)."""
    res = res or timm.create_model(student).pretrained_cfg["input_size"][-1]
    config = TrainConfig([str(store.path)], run_dir=str(run_dir), student=student, student_res=res, batch_size=4,
                         steps=3, lr=3e-3, workers=0, device="cpu", precision="fp32", pixel_cache="no")
    train(config, progress=False, log=lambda m: None)
    return run_dir


def open_clip_predictions(folder, store, templates):
    """open_clip alone: its transform, image tower, tokenizer and text tower; CLIP_benchmark's classifier."""
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    reader = RowReader(store.sources)
    with torch.no_grad():
        images = torch.stack([transform(reader.image(k, loc)) for k, loc in zip(store.keys(), store.locs())])
        z = model.encode_image(images, normalize=True)
        rows = []
        for name in store.classnames:
            t = model.encode_text(tokenizer([tpl.format(c=name.replace("_", " ")) for tpl in templates]),
                                  normalize=True)
            rows.append(F.normalize(t.mean(0), dim=-1))
        w = torch.stack(rows)
    return z.numpy(), (z @ w.T).argmax(1).numpy()


# A CNN with a plain head, MobileNetV3 (pre-logits 1024 wide, not num_features 288) and a token-pooled ViT at its
# default resolution (open_clip builds timm models at their default resolution; test_vit's is 160 px).
@pytest.mark.parametrize("student,res", [("resnet10t", 32), ("mobilenetv3_small_050", 48), ("test_vit", None)])
def test_round_trip_open_clip_and_zsd_eval_agree(store, tmp_path, tiny_clip_dir, tiny_teacher_name, student, res,
                                                  capsys):
    run = fit(store, tmp_path / "run", student, res)
    folder = tmp_path / "folder"
    code, out, err = cli(["export", run, "--format", "open_clip", "--out", folder, "--json", tmp_path / "p.json"],
                         capsys)
    assert code == 0, err
    assert "parity on 64 images" in err and "tokens equal" in err
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["parity"]["max_abs_embedding"] <= 1e-4 and record["parity"]["top1_agreement"] == 1.0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "open_clip_config.json",
                                                        "open_clip_model.safetensors"]

    # the keys load strictly, the text tower and logit scale are the teacher's tensors, the tokenizer its tokenizer
    weights = load_file(str(folder / "open_clip_model.safetensors"))
    skeleton = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    assert set(weights) == set(skeleton.state_dict())
    teacher_weights = load_file(str(tiny_clip_dir / "open_clip_model.safetensors"))
    text = [k for k in teacher_weights if not k.startswith("visual.")]
    assert text and all(torch.equal(weights[k], teacher_weights[k]) for k in text)
    prompts = ["a photo of a dog.", "a fish tank"]
    teacher = create_teacher(tiny_teacher_name, None, "cpu")
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{folder}")(prompts), teacher.tokenizer(prompts))

    # open_clip's own transform is the student's eval transform, recorded in student.json
    config = json.loads((folder / "open_clip_config.json").read_text())
    pre = load_student(run)[1]["preprocess"]
    assert {k: config["preprocess_cfg"][k] for k in ("size", "mean", "std", "interpolation", "resize_mode")} == \
           {k: pre[k] for k in ("size", "mean", "std", "interpolation", "resize_mode")} and pre["resize"] == pre["size"]

    # round trip: open_clip zero-shot with the folder == zsd eval of the run, image by image
    _, templates = resolve_templates(None, "s")
    oc_emb, oc_pred = open_clip_predictions(folder, store, templates)
    zsd_emb = student_embeddings(run, store, progress=False).embeddings(view=0).astype(np.float32)
    assert np.abs(oc_emb - zsd_emb).max() <= 5e-4  # the store keeps fp16: 2^-11 relative
    w = zero_shot_classifier(teacher, [n.replace("_", " ") for n in store.classnames], templates)
    zsd_pred = (zsd_emb @ w.T).argmax(1)
    assert np.array_equal(oc_pred, zsd_pred)
    # and `zsd eval --student FOLDER` gives the run's figures, adding nothing to the folder
    files = sorted(folder.iterdir())
    results = evaluate(str(store.path), [str(run), str(folder)], device="cpu", progress=False, log=lambda m: None)
    assert results[1]["metrics"] == results[2]["metrics"]
    assert results[1]["metrics"]["acc1"] == pytest.approx(np.mean(zsd_pred == store.labels()))
    assert sorted(folder.iterdir()) == files


def test_refused_in_one_line_and_nothing_left(store, tmp_path, image_folder, resnet_checkpoint, capsys):
    def export(run, out, *extra):
        code, _, err = cli(["export", run, "--format", "open_clip", "--out", out, *extra], capsys)
        assert code != 0 and err.startswith("zsd: error:") and len(err.strip().splitlines()) == 1, err
        assert not list(tmp_path.glob(f"**/.{Path(out).name}.*"))  # no temp folder left
        return err

    # a ViT at another resolution than timm's default: open_clip would build another model
    vit = fit(store, tmp_path / "vit32", "test_vit", 32)
    assert "trained at 32 px" in export(vit, tmp_path / "o1") and not (tmp_path / "o1").exists()
    # a teacher without a text tower
    cache_teacher([str(image_folder)], str(tmp_path / "t.zarr"), teacher="timm:test_resnet",
                  pretrained=str(resnet_checkpoint), views=1, workers=0, progress=False, log=lambda m: None)
    timm_run = fit(open_store(tmp_path / "t.zarr"), tmp_path / "timm_run", "test_efficientnet", 32)
    assert "--format onnx" in export(timm_run, tmp_path / "o2") and not (tmp_path / "o2").exists()
    # a half-written run (no student yet), an existing --out (left as it was), an --out below a file
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train_state.pt").write_bytes(b"")
    assert "holds no trained student" in export(tmp_path / "half", tmp_path / "o3")
    run = fit(store, tmp_path / "run", "resnet10t", 32)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    assert "already exists" in export(run, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
    (tmp_path / "file").write_text("")
    assert "cannot write" in export(run, tmp_path / "file" / "folder")
    assert "only for --format onnx" in export(run, tmp_path / "o4", "--fp16")


def test_a_failing_parity_check_writes_nothing(store, tmp_path, monkeypatch, capsys):
    """A folder whose open_clip transform is not zsd's (simulated: another interpolation written into its
    preprocess_cfg) fails the check on open_clip's own pixels, and nothing is written."""
    from zsd import open_clip_folder

    run = fit(store, tmp_path / "run", "resnet10t", 32)
    real = open_clip_folder.preprocess_cfg
    monkeypatch.setattr(open_clip_folder, "preprocess_cfg", lambda pre: {**real(pre), "interpolation": "bilinear"})
    code, _, err = cli(["export", run, "--format", "open_clip", "--out", tmp_path / "o"], capsys)
    error = err.strip().splitlines()[-1]
    assert code != 0 and error.startswith("zsd: error: parity check failed, nothing written"), err
    assert "(each its own transform)" in error and "(same pixels)" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_hugging_face_tokenizer_travels_with_the_folder(tmp_path, image_folder, capsys):
    """A teacher whose tokenizer is a Hugging Face one (SigLIP-style `hf_tokenizer_name`): the folder carries the
    tokenizer files, so it tokenizes as the teacher did after the teacher's folder is gone."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "a", "photo", "of", "dog", "cat", "fish", "tank", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    teacher_dir = tmp_path / "teacher"
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(teacher_dir)
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": len(words), "width": 16, "heads": 1, "layers": 1,
                        "hf_tokenizer_name": "tiny-wordlevel", "pad_id": 0, "no_causal_mask": True,
                        "pool_type": "last", "final_ln_after_pool": True}}
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**cfg).state_dict().items()},
              str(teacher_dir / "open_clip_model.safetensors"))
    (teacher_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "shortest"}}))
    cache_teacher([str(image_folder)], str(tmp_path / "s.zarr"), teacher=f"local-dir:{teacher_dir}", views=1,
                  workers=0, progress=False, log=lambda m: None)
    run = fit(open_store(tmp_path / "s.zarr"), tmp_path / "run", "resnet10t", 32)
    code, _, err = cli(["export", run, "--format", "open_clip", "--out", tmp_path / "folder"], capsys)
    assert code == 0 and "tokens equal" in err, err
    prompts = ["a photo of a dog .", "a fish tank"]
    want = open_clip.get_tokenizer(f"local-dir:{teacher_dir}")(prompts)
    assert (want[:, :6] > 1).any() and not (want == 1).all()  # real words, not unknowns: the check can fail
    teacher_dir.rename(tmp_path / "gone")
    assert (tmp_path / "folder" / "tokenizer.json").is_file()
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{tmp_path / 'folder'}")(prompts), want)


def test_the_model_card_runs_as_written_and_a_folder_is_a_student(store, tmp_path, capsys):
    """The card's snippet, run as printed, gives the student's embedding (in eval mode: BatchNorm students differ
    in training mode); results of these weights under RUN/eval reach the card, other weights' do not; a folder
    trains on (--init) and exports again, and --json - prints the JSON alone."""
    from zsd.views import Preprocess, normalize, render_view

    run = fit(store, tmp_path / "run", "mobilenetv3_small_050", 48)
    evaluate(str(store.path), [str(run)], device="cpu", out_dir=str(run / "eval"), progress=False, log=lambda m: None)
    stale = json.loads(next((run / "eval").glob("*__run.json")).read_text())
    (run / "eval" / "stale.json").write_text(json.dumps({**stale, "pretrained": "sha256:other", "dataset": "old"}))
    folder = tmp_path / "folder"
    code, out, _ = cli(["export", run, "--format", "open_clip", "--out", folder, "--json", "-"], capsys)
    assert code == 0 and json.loads(out)["format"] == "zsd-open_clip/1"  # stdout is the JSON alone
    card = (folder / "README.md").read_text()
    assert "| s | " in card and "| old |" not in card
    snippet = card.split("```python\n")[1].split("```")[0].replace("THIS_FOLDER", str(folder))
    image = RowReader(store.sources).image(store.keys()[0], store.locs()[0])
    scope = {"pil_image": image}
    exec(snippet, scope)
    student, config = load_student(folder)
    p = Preprocess.from_dict(config["preprocess"])
    want = student.encode_images(normalize(render_view(image, 0, None, p), p.mean, p.std)[None])
    with torch.no_grad():
        got = scope["model"].encode_image(scope["image"], normalize=True)
    assert torch.allclose(got, want, atol=1e-4) and scope["probs"].shape == (1, 2)
    # the folder is a student: the same weights as the run, a start for stage 2, exportable again
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                 load_student(run)[0].state_dict().values()))
    config2 = TrainConfig([str(store.path)], run_dir=str(tmp_path / "stage2"), init_from=str(folder), batch_size=4,
                          steps=1, workers=0, device="cpu", precision="fp32", pixel_cache="no")
    train(config2, progress=False, log=lambda m: None)
    assert cli(["export", folder, "--format", "open_clip", "--out", tmp_path / "again"], capsys)[0] == 0


def test_a_tower_open_clip_builds_otherwise_is_refused_without_the_check(store, tmp_path, monkeypatch, capsys):
    """A student whose tensors fit open_clip's tower but whose tower computes otherwise (Swin at another
    resolution: an assertion in its forward) is refused under --no-check too; parent folders made for --out go."""
    from open_clip.timm_model import TimmModel

    run = fit(store, tmp_path / "run", "resnet10t", 32)

    def built_for_another_size(self, x):
        raise AssertionError(f"Input height ({x.shape[-2]}) doesn't match model (224).")

    monkeypatch.setattr(TimmModel, "forward", built_for_another_size)
    code, _, err = cli(["export", run, "--format", "open_clip", "--no-check", "--out", tmp_path / "a" / "b" / "o"],
                       capsys)
    assert code == 1 and "cannot run at 32 px" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_still_training_warns_its_card_names_the_weights_step_and_files_are_readable(store, tmp_path, capsys):
    """Weights of step 2 of a 6-step run whose trainer holds the folder's lock: one warning line naming the
    holder and that step; the card says "steps: 2 of 6" (not the run's total); every file of the folder gets the
    mode a plain open gives under the umask (safetensors' save_file alone leaves 0600)."""
    import os
    import stat

    from zsd.store import folder_lock

    config = TrainConfig([str(store.path)], run_dir=str(tmp_path / "run"), student="resnet10t", student_res=32,
                         batch_size=4, steps=6, workers=0, device="cpu", precision="fp32", pixel_cache="no")
    train(config, stop_after=2, progress=False, log=lambda m: None)
    run = tmp_path / "run"
    assert json.loads((run / "student.json").read_text())["step"] == 2
    old = os.umask(0o022)
    try:
        with folder_lock(run, wait=False, holder="`zsd train` (pid 4242 on box)"):
            code, _, err = cli(["export", run, "--format", "open_clip", "--out", tmp_path / "f", "--check-n", "4"],
                               capsys)
        assert code == 0, err
        warnings = [line for line in err.splitlines() if line.startswith("warning:")]
        assert warnings == [f"warning: {run} is still being trained by `zsd train` (pid 4242 on box): these are the "
                            "weights of its checkpoint at step 2 of 6; export again when the run ends"]
        assert "- steps: 2 of 6, losses:" in (tmp_path / "f" / "README.md").read_text()
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "f", *(tmp_path / "f").iterdir()]}
        assert modes == {"f": 0o755, "README.md": 0o644, "open_clip_config.json": 0o644,
                         "open_clip_model.safetensors": 0o644}
        # another umask, other modes: the umask decides, not a fixed 0644
        os.umask(0o027)
        code, _, err = cli(["export", run, "--format", "open_clip", "--out", tmp_path / "g", "--check-n", "4"], capsys)
    finally:
        os.umask(old)
    assert code == 0 and "warning:" not in err  # the lock is released: no trainer, no warning
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "g").iterdir()} == {0o640}
