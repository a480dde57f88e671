"""A student as an open_clip model folder: `zsd export --format open_clip` writes it.

The folder is the layout open_clip's `local-dir:` schema and the Hugging Face hub read:
`open_clip_config.json` (`model_cfg`, `preprocess_cfg`), `open_clip_model.safetensors`, tokenizer
files where the teacher's tokenizer needs them, and a model card `README.md`. The model is the
teacher's CLIP with its vision tower replaced by the student, so `encode_text`, the tokenizer and
`logit_scale` are the teacher's, and class names can be chosen after export.

open_clip's timm tower holds a zsd student exactly: with `timm_proj: ""` it builds the timm model
with `num_classes = embed_dim`, and that classifier (a Linear with bias, on the pooled pre-logits:
`head_hidden_size` wide for MobileNetV3, the class token for a token-pooled ViT) is the student's
projection. What open_clip cannot build the same way (a ViT at another resolution than timm's
default: open_clip passes no `img_size` to timm) is refused, never exported approximately; the
parity check loads the written folder with open_clip itself and compares it with zsd before the
folder gets its name.

`config["zsd"]` in the folder's config records the student as `student.json` does, so
`load_student(DIR)` and with it `zsd eval --student DIR` take an exported folder as they take a run
(reading a folder back is zsd.student's: this module only writes).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zsd import __version__
from zsd.classes import read_classnames
from zsd.errors import ZsdError, atomic_file, check_at_least, check_writable, first_missing
from zsd.export import check_images
from zsd.guarantee import shipped_guarantee
from zsd.hub import offline_unless_reachable
from zsd.student import (OPEN_CLIP_CONFIG as CONFIG, OPEN_CLIP_FORMAT as FORMAT, OPEN_CLIP_WEIGHTS as WEIGHTS,
                         load_student, resolve_student, steps_text, still_training, student_fingerprint)
from zsd.teachers import rebuild_teacher
from zsd.views import Preprocess, normalize, render_view

TOLERANCE = 1e-4  # max abs difference of unit image embeddings, zsd vs open_clip
PARITY_CLASSES = ["dog", "cat", "car", "bird", "flower", "airplane", "food", "house"]


# ---------------------------------------------------------------- the vision tower

def _pool_type(backbone: nn.Module) -> str | None:
    """The timm model's global pooling as a `global_pool` argument ('avg', 'token', ...)."""
    for owner in (backbone, getattr(backbone, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str):
            return pool
        if pool is not None and isinstance(getattr(pool, "pool_type", None), str):
            return pool.pool_type
    return None


def vision_cfg(student, size: int) -> dict:
    """open_clip's `vision_cfg` for a timm tower whose classifier is the student's projection."""
    if student.name.startswith("local-dir:"):
        raise ZsdError(f"the student {student.name} is a timm model in a local folder: an open_clip folder can only "
                       "name a timm model that open_clip users can create (a timm name or hf-hub:ORG/REPO)")
    pool = _pool_type(student.backbone)
    if pool is None:
        raise ZsdError(f"cannot tell the global pooling of the {student.name} student, so open_clip's timm tower "
                       "cannot be set up to match it: export ONNX (--format onnx) instead")
    return {"timm_model_name": student.name, "timm_model_pretrained": False, "timm_pool": pool, "timm_proj": "",
            "image_size": size}


def visual_state(student, visual: nn.Module, size: int) -> dict[str, torch.Tensor]:
    """The student's weights under open_clip's timm tower names (`trunk.*`); one line if they do not fit."""
    trunk = visual.trunk
    head = trunk.get_classifier()
    if not isinstance(head, nn.Linear) or head.in_features != student.proj.in_features:
        raise ZsdError(f"open_clip's timm tower puts a {type(head).__name__} on {student.name}'s pooled features, "
                       f"not one Linear of {student.proj.in_features} inputs like the student's projection: "
                       "export ONNX (--format onnx) instead")
    head_name = next(n for n, m in trunk.named_modules() if m is head)
    state = {f"trunk.{k}": v for k, v in student.backbone.state_dict().items()}
    state.update({f"trunk.{head_name}.{k}": v for k, v in student.proj.state_dict().items()})
    target = visual.state_dict()
    missing, unknown = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    wrong = [k for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unknown or wrong:
        default = trunk.pretrained_cfg.get("input_size", (0, 0, 0))[-1]
        why = (f"{wrong[0]} is {tuple(state[wrong[0]].shape)} in the student and {tuple(target[wrong[0]].shape)} "
               f"in open_clip's tower" if wrong else
               f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else
               f"{len(unknown)} tensors unknown to open_clip (e.g. {unknown[0]})")
        hint = (f"; open_clip builds timm models at their default resolution ({default} px) and this one was "
                f"trained at {size} px: train it at {default} px (--student-res {default})"
                if wrong and default and size != default else "")
        raise ZsdError(f"open_clip cannot hold the {student.name} student exactly: {why}{hint}, or export ONNX "
                       "(--format onnx)")
    return state


# ---------------------------------------------------------------- the folder

def teacher_model_cfg(name: str) -> dict:
    """The open_clip model config the teacher `name` was built from (built-in name, local-dir: or hf-hub:)."""
    import open_clip

    try:
        if name.startswith("local-dir:"):
            cfg = json.loads((Path(name[len("local-dir:"):]) / CONFIG).read_text())["model_cfg"]
        elif name.startswith("hf-hub:"):
            from huggingface_hub import hf_hub_download

            with offline_unless_reachable():
                cfg = json.loads(Path(hf_hub_download(name[len("hf-hub:"):], CONFIG)).read_text())["model_cfg"]
        else:
            cfg = open_clip.get_model_config(name)
    except Exception as e:  # the teacher loaded a moment ago: its config went missing in between
        raise ZsdError(f"cannot read the open_clip config of the teacher {name} [{type(e).__name__}: "
                       f"{str(e).splitlines()[0][:160] if str(e) else ''}]") from None
    if cfg is None:
        raise ZsdError(f"no open_clip model config for the teacher {name}")
    if "multimodal_cfg" in cfg:  # CoCa: its text decoder reads the vision tower's tokens, which a student has not
        raise ZsdError(f"the teacher {name} is a CoCa model, whose captioning decoder needs its own vision tower's "
                       "tokens: export ONNX (--format onnx) instead")
    return copy.deepcopy(cfg)


def preprocess_cfg(pre: Preprocess) -> dict:
    """open_clip's `preprocess_cfg` for zsd's transform; one line where open_clip's transform differs."""
    if pre.resize != pre.size:
        raise ZsdError(f"the student is evaluated by resizing to {pre.resize} px and cropping {pre.size} px, which "
                       "open_clip's transform (no crop margin) cannot do: its teacher's transform crops too, so "
                       "export ONNX (--format onnx) instead")
    if pre.interpolation not in ("bicubic", "bilinear"):
        raise ZsdError(f"open_clip's transform has no {pre.interpolation} interpolation: export ONNX instead")
    return {"size": pre.size, "mode": "RGB", "mean": list(pre.mean), "std": list(pre.std),
            "interpolation": pre.interpolation, "resize_mode": pre.resize_mode, "fill_color": 0}


def _section(title: str, text: str) -> list[str]:
    return [f"## {title}", "", text, ""]


def model_card(config: dict, record: dict, results: list[dict]) -> str:
    teacher = config["teacher"]
    train = config.get("train_config") or {}
    lines = [
        "---", "library_name: open_clip", "tags: [clip, zero-shot-image-classification, zsd, distillation]", "---",
        f"# {config['student']} distilled from {teacher['model']}", "",
        f"A {config['student']} image encoder (input {config['preprocess']['size']} px) that reproduces the image "
        f"embeddings of the CLIP model {teacher['model']} ({teacher['weights']}), made with "
        f"zsd {__version__} by feature distillation. The text tower, tokenizer and logit scale "
        "are the teacher's, unchanged: classify with any class names, as with the teacher.", "",
        "## Use", "", "```python", "import open_clip, torch", "",
        "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:THIS_FOLDER')",
        "model.eval()  # open_clip returns it in training mode (BatchNorm would use batch statistics)",
        "tokenizer = open_clip.get_tokenizer('local-dir:THIS_FOLDER')",
        "image = preprocess(pil_image).unsqueeze(0)",
        "text = tokenizer(['a photo of a dog.', 'a photo of a cat.'])",
        "with torch.no_grad():",
        "    probs = (model.logit_scale.exp() * model.encode_image(image, normalize=True)",
        "             @ model.encode_text(text, normalize=True).T).softmax(-1)", "```", "",
        "## Training", "",
        f"- teacher: `{teacher['model']}` ({teacher['weights']}), teacher id {config.get('teacher_id')}",
        f"- targets: {', '.join(map(str, train.get('targets', []))) or 'not recorded'}",
        f"- steps: {steps_text(config)}, losses: {train.get('losses', 'not recorded')}",
        f"- exported from the run {record['run']} ({record['student_weights'][:19]}...)", "",
    ]
    if results:
        lines += ["## Zero-shot results (`zsd eval`)", "", "| data set | top-1 % | top-5 % | agreement with teacher % |",
                  "|---|---|---|---|"]
        lines += [f"| {r['dataset']} | {100 * r['metrics']['acc1']:.1f} | {100 * r['metrics']['acc5']:.1f} | "
                  f"{100 * r['metrics'].get('agreement_with_teacher', float('nan')):.1f} |" for r in results]
        lines.append("")
    calibration = record.get("calibration")
    if calibration:
        names = calibration["classnames"]
        lines += _section("Calibrated guarantee (`zsd calibrate`)",
                          f"With the {calibration['score']['name']} score at threshold {calibration['threshold']}, "
                          f"measured on {calibration['n_calibration']} calibration photos: {calibration['statement']}. "
                          f"It {calibration['scope']} ({len(names)} classes: {', '.join(names[:10])}"
                          f"{', ...' if len(names) > 10 else ''}). Predictions whose score is below the threshold "
                          "abstain; the record is in `open_clip_config.json` under `zsd.calibration`.")
    parity = record.get("parity")
    if parity:
        lines += _section("Parity with zsd",
                          f"Checked at export on {parity['images']} images: max abs difference of unit image "
                          f"embeddings {parity['max_abs_embedding']:.1e} (same pixels), "
                          f"{parity['max_abs_embedding_own_transform']:.1e} (each with its own transform); text "
                          f"embeddings {parity['max_abs_text']:.1e}; zero-shot top-1 agreement "
                          f"{100 * parity['top1_agreement']:.1f} %.")
    return "\n".join(lines)


def run_results(run_dir: Path, weights: str) -> list[dict]:
    """`zsd eval --out-dir RUN/eval` results (the quickstart writes them there) of exactly these weights."""
    out = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(r, dict) and r.get("role") == "student" and r.get("pretrained") == weights:
            out.append(r)
    return out


def export_open_clip(run: str, out: str | os.PathLike, *, classes: str | None = None,
                     pretrained: str | None = None, check: bool = True, check_images_from: str | None = None,
                     check_n: int = 64, tolerance: float | None = None, log=print) -> dict:
    """Write the open_clip folder OUT for the student of RUN; returns the folder's zsd record (with parity)."""
    check_at_least("--tolerance", tolerance, 0)
    out = Path(out)
    if out.exists():
        raise ZsdError(f"--out {out} already exists: name a new folder (an open_clip folder is written whole)")
    check_writable(out.parent, "--out")
    ref = resolve_student(run)
    student, config = load_student(ref, "cpu")
    if warning := still_training(ref, config):
        log(warning)
    if config["teacher"].get("backend") != "open_clip":
        raise ZsdError(f"the student of {run} was distilled from {config['teacher'].get('model')}, which has no text "
                       "tower: there is no CLIP model to export; use --format onnx (with --classes or --classes-from "
                       "for a classifier)")
    pre = Preprocess.from_dict(config["preprocess"])
    oc_preprocess = preprocess_cfg(pre)
    teacher = rebuild_teacher(config["teacher"], config["teacher_id"], pretrained, "cpu")
    model_cfg = teacher_model_cfg(teacher.model_name)
    model_cfg["vision_cfg"] = vision_cfg(student, pre.size)
    if int(model_cfg["embed_dim"]) != int(config["embed_dim"]):
        raise ZsdError(f"the teacher's open_clip config has embed_dim {model_cfg['embed_dim']}, the student "
                       f"{config['embed_dim']}: not this student's teacher")
    names = read_classnames(classes) if classes else (config.get("classnames") or PARITY_CLASSES)[:16]
    images = check_images(check_images_from, check_n) if check else []
    weights = student_fingerprint(ref, config)["weights"]
    record = {"format": FORMAT, "zsd_version": __version__, "run": ref.spec, "student_weights": weights, **config}
    calibration, why = shipped_guarantee(ref, weights)  # open_clip classifies any names: the record says which it holds for
    if calibration:
        record["calibration"] = calibration
    elif why:
        log(f"note: {why}; the folder carries no guarantee")
    made = first_missing(out.parent)  # removed again on failure, as the folder itself
    try:
        with atomic_file(out) as tmp:  # the folder appears whole or not at all
            tmp.mkdir(parents=True)
            _write_folder(tmp, student, teacher, model_cfg, oc_preprocess, record)
            if check:
                record["parity"] = report = parity(tmp, student, pre, teacher, names, images)
                report.update(source=check_images_from or "generated", tolerance=TOLERANCE if tolerance is None
                              else tolerance)
                log(parity_text(report))
                failed = parity_failures(report, int(config["embed_dim"]))
                if failed:
                    raise ZsdError(f"parity check failed, nothing written: open_clip vs zsd: {'; '.join(failed)} on "
                                   f"{report['images']} images")
                _write_config(tmp, model_cfg, oc_preprocess, record)
            (tmp / "README.md").write_text(model_card(config, record, run_results(ref.folder, weights)))
    except BaseException as e:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(e, OSError):
            raise ZsdError(f"--out {out}: cannot write {e.filename or out} ({e.strerror or e}); nothing written") \
                from None
        raise
    return record


def _write_config(folder: Path, model_cfg: dict, oc_preprocess: dict, record: dict) -> None:
    (folder / CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": oc_preprocess, "zsd": record},
                                            indent=2) + "\n")


def _write_folder(folder: Path, student, teacher, model_cfg: dict, oc_preprocess: dict, record: dict) -> None:
    """Config, weights (the student's under open_clip's names, every other tensor the teacher's), tokenizer."""
    import open_clip
    from safetensors.torch import save_file

    _write_config(folder, model_cfg, oc_preprocess, record)
    logging.disable(logging.WARNING)  # open_clip's "initialized randomly": the skeleton only names the tensors
    try:
        skeleton = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    finally:
        logging.disable(logging.NOTSET)
    size = oc_preprocess["size"]
    visual = visual_state(student, skeleton.visual, size)
    _check_tower_runs(student, skeleton.visual, visual, size)
    state = {k: v for k, v in teacher.model.state_dict().items() if not k.startswith("visual.")}
    state.update({f"visual.{k}": v for k, v in visual.items()})
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(folder / WEIGHTS))
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):  # open_clip reads it from the folder
        teacher.tokenizer.tokenizer.save_pretrained(str(folder))


@torch.inference_mode()
def _check_tower_runs(student, tower: nn.Module, state: dict, size: int) -> None:
    """open_clip's tower with the student's weights computes the student, also under --no-check: a model
    whose tensors do not depend on the resolution (Swin) may still be built for another one."""
    tower.load_state_dict(state)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        got = tower.eval()(x)
    except Exception as e:
        raise ZsdError(f"open_clip's timm tower of {student.name} cannot run at {size} px (it builds timm models at "
                       f"their default resolution): train the student at its default resolution or export ONNX "
                       f"(--format onnx) [{type(e).__name__}: {str(e).splitlines()[0][:120]}]") from None
    if got.shape != (2, student.embed_dim) or not torch.allclose(got, student.eval()(x), atol=1e-4, rtol=1e-4):
        raise ZsdError(f"open_clip's timm tower computes something else than the {student.name} student: "
                       "export ONNX (--format onnx) instead")


def parity_failures(report: dict, dim: int) -> list[str]:
    tol = report["tolerance"]
    logit_tol = tol * report["logit_scale"] * math.sqrt(dim)  # |d logits| <= scale * sqrt(D) * max|d z|
    failed = [f"{what} {report[key]:.2e} > {limit:.0e}" for what, key, limit in (
        ("image embeddings (same pixels)", "max_abs_embedding", tol),
        ("image embeddings (each its own transform)", "max_abs_embedding_own_transform", tol),
        ("text embeddings", "max_abs_text", tol), ("zero-shot logits", "max_abs_logits", logit_tol))
        if not report[key] <= limit]
    if not report["tokens_equal"]:
        failed.insert(0, "the folder's tokenizer gives other tokens than the teacher's")
    return failed


# ---------------------------------------------------------------- parity

@torch.inference_mode()
def parity(folder: Path, student, pre: Preprocess, teacher, names: list[str], images: list) -> dict:
    """The folder loaded by open_clip itself against zsd's student and teacher, on the same images and prompts."""
    import open_clip

    try:
        model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except Exception as e:
        raise ZsdError(f"open_clip cannot load the written folder, nothing written [{type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}]") from None
    model.eval()
    mine = torch.stack([normalize(render_view(img, 0, None, pre), pre.mean, pre.std) for img in images])
    theirs = torch.stack([transform(img) for img in images])
    want = student.encode_images(mine)
    same = F.normalize(model.encode_image(mine).float(), dim=-1)
    own = F.normalize(model.encode_image(theirs).float(), dim=-1)
    prompts = [f"a photo of a {n}." for n in names]
    tokens, teacher_tokens = tokenizer(prompts), teacher.tokenizer(prompts)
    text = F.normalize(model.encode_text(tokens).float(), dim=-1)
    teacher_text = F.normalize(teacher.model.encode_text(teacher_tokens).float(), dim=-1)
    scale = float(model.logit_scale.exp())
    logits, zsd_logits = scale * own @ text.T, float(teacher.model.logit_scale.exp()) * want @ teacher_text.T
    return {"images": len(images), "classes": len(names), "logit_scale": scale,
            "max_abs_pixels": float((theirs - mine).abs().max()),
            "max_abs_embedding": float((same - want).abs().max()),
            "max_abs_embedding_own_transform": float((own - want).abs().max()),
            "tokens_equal": bool(tokens.shape == teacher_tokens.shape and torch.equal(tokens, teacher_tokens)),
            "max_abs_text": float((text - teacher_text).abs().max()),
            "max_abs_logits": float((logits - zsd_logits).abs().max()),
            "top1_agreement": float((logits.argmax(1) == zsd_logits.argmax(1)).float().mean())}


def parity_text(report: dict) -> str:
    return (f"parity on {report['images']} images ({report['source']}), {report['classes']} class prompts: open_clip "
            f"vs zsd max abs difference {report['max_abs_embedding']:.2e} (image embeddings, same pixels), "
            f"{report['max_abs_embedding_own_transform']:.2e} (each with its own transform; pixels differ by "
            f"{report['max_abs_pixels']:.1e}), {report['max_abs_text']:.2e} (text embeddings; tokens "
            f"{'equal' if report['tokens_equal'] else 'DIFFER'}), {report['max_abs_logits']:.2e} (zero-shot logits), "
            f"top-1 agreement {100 * report['top1_agreement']:.1f} %")
