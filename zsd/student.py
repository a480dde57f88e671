"""Students: a timm backbone without its classifier plus one linear projection to the teacher's dim.

A trained student is two files in its run folder: `student.safetensors` (weights) and
`student.json` (what it is: timm name, embedding dim, input preprocessing, the teacher it was
distilled from, training config), so `load_student(RUN_DIR)` rebuilds it with one call. A run
trained with an EMA of its weights also holds `ema_student.safetensors` + `ema_student.json`;
the student spec `RUN_DIR:ema` names that one wherever a student is taken (load_student, eval,
coverage).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from zsd.errors import ZsdError, atomic_file
from zsd.hub import offline_unless_reachable
from zsd.views import Preprocess, timm_preprocess

WEIGHTS, CONFIG = "student.safetensors", "student.json"
EMA_PREFIX = "ema_"  # the EMA student's files: ema_student.safetensors, ema_student.json


class Student(nn.Module):
    def __init__(self, name: str, embed_dim: int, image_size: int | None = None):
        super().__init__()
        try:
            self.backbone = _backbone(name, image_size)
        except RuntimeError as e:
            raise ZsdError(f"cannot create timm student {name!r}: {str(e).splitlines()[0]}") from None
        # Pooled output width: head_hidden_size where a pre-logits layer follows the features (MobileNetV3).
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.proj = nn.Linear(width, embed_dim)
        self.name, self.embed_dim = name, embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings; losses and evaluation normalise."""
        return self.proj(self.backbone(x))

    @torch.inference_mode()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self(x).float(), dim=-1)


def _backbone(name: str, image_size: int | None, pretrained: bool = False) -> nn.Module:
    kwargs = {"img_size": image_size} if image_size and _takes_img_size(name) else {}
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError:  # ViT-like models without a fixed grid (TinyViT) take no img_size
        return timm.create_model(name, pretrained=pretrained, num_classes=0)


def _takes_img_size(name: str) -> bool:
    # ViT-like timm models fix their patch grid at creation; CNNs take any resolution.
    return any(k in name for k in ("vit", "deit", "swin", "eva", "beit", "tiny_vit", "levit", "xcit"))


def check_student_name(name: str) -> None:
    """An unknown timm name fails here, with suggestions, before anything is read or written."""
    if ":" in name or timm.is_model(name):  # hf-hub:/local-dir: names are resolved by timm on creation
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    raise ZsdError(f"--student {name}: not a timm model" + (f"; did you mean {', '.join(close)}?" if close
                                                              else " (python -c 'import timm; print(timm.list_models())')"))


def student_preprocess(name: str, teacher: Preprocess, image_size: int | None = None) -> Preprocess:
    """What the student is shown at evaluation: the teacher's evaluation geometry (resize, crop,
    interpolation) at the student's resolution (`image_size`, default timm's), normalised with the
    student's own mean and std.

    The student learns from the teacher's views rendered at its resolution, so this is its training
    view 0 in one resize. timm's own eval transform would crop tighter (crop_pct 0.875-0.95) than an
    open_clip teacher (crop 1.0): a field of view the student never trained on.
    """
    check_student_name(name)
    own = timm_preprocess(timm.create_model(name, pretrained=False, num_classes=0), image_size)
    return teacher.at(own.size, own.mean, own.std)


def eval_preprocess(config: dict) -> Preprocess:
    """A saved student's evaluation preprocessing: the teacher's geometry at the recorded size, mean and std.

    For a run saved now that is the recorded transform (`student_preprocess`). Older runs recorded
    timm's own crop; they are evaluated with the teacher's geometry too."""
    recorded = Preprocess.from_dict(config["preprocess"])
    teacher = (config.get("teacher") or {}).get("preprocess")
    if not teacher:  # a student without a recorded teacher transform keeps what it recorded
        return recorded
    return Preprocess.from_dict(teacher).at(recorded.size, recorded.mean, recorded.std)


def load_pretrained_backbone(model: Student, spec: str, image_size: int | None = None) -> None:
    """Initialise the student's backbone from pretrained timm weights; the projection stays as it is.

    SPEC: `timm` (the timm name's default pretrained weights; name a tag in the student, e.g.
    resnet18.a1_in1k, for others), `hf-hub:ORG/REPO` (a timm weights repository), or a local
    .safetensors/.pth file of the model's timm weights. Classifier weights are ignored (the
    backbone has no classifier); any other difference in names or shapes is an error.
    """
    from timm.models import load_state_dict, load_state_dict_from_hf

    if spec == "timm" or spec.startswith("hf-hub:"):
        try:
            with offline_unless_reachable():
                state = (_backbone(model.name, image_size, pretrained=True).state_dict() if spec == "timm"
                         else load_state_dict_from_hf(spec[len("hf-hub:"):]))
        except Exception as e:
            raise ZsdError(f"could not download the {spec} weights of the student {model.name} (offline?): pass "
                           f"--student-pretrained FILE, a local .safetensors or .pth of its timm weights, instead "
                           f"[{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}]") from None
    elif Path(spec).is_file():
        state = load_state_dict(spec)
    else:
        raise ZsdError(f"--student-pretrained {spec}: not `timm`, not hf-hub:ORG/REPO and not a file")
    target = model.backbone.state_dict()
    head = model.backbone.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head))
    state = {k: v for k, v in state.items() if not k.startswith(heads)}
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unknown = [k for k in state if k not in target]
    if missing or unknown:
        raise ZsdError(f"--student-pretrained {spec} does not hold {model.name} backbone weights: "
                       f"{len(missing)} of its tensors missing{f' (e.g. {missing[0]})' if missing else ''}, "
                       f"{len(unknown)} unknown{f' (e.g. {unknown[0]})' if unknown else ''}")
    wrong = [k for k in state if state[k].shape != target[k].shape]
    if wrong:
        k = wrong[0]
        raise ZsdError(f"--student-pretrained {spec} does not fit the {model.name} student: {k} is "
                       f"{tuple(state[k].shape)} there and {tuple(target[k].shape)} here"
                       + (f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""))
    model.backbone.load_state_dict(state, strict=False)


def student_location(spec: str | os.PathLike) -> tuple[Path, str]:
    """(run folder, file prefix) of a student spec: RUN_DIR or a file in it, or RUN_DIR:ema for its EMA."""
    spec = str(spec)
    if spec.endswith(":ema"):
        return Path(spec[:-len(":ema")]), EMA_PREFIX
    path = Path(spec)
    if path.is_file():  # student.json or ema_student.safetensors, ...: the prefix is in the name
        return path.parent, path.name.removesuffix(CONFIG).removesuffix(WEIGHTS)
    return path, ""


def save_student(run_dir: str | os.PathLike, model: Student, config: dict, prefix: str = "") -> None:
    """Write weights and config atomically (temp + rename), so a kill never leaves half a student."""
    from safetensors.torch import save

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    w, c = run_dir / (prefix + WEIGHTS), run_dir / (prefix + CONFIG)
    # The inner block is renamed first: the weights, then the config that describes them.
    with atomic_file(c) as ct, atomic_file(w) as wt:  # Python's write: a full disk raises OSError
        wt.write_bytes(save(state))
        ct.write_text(json.dumps(config, indent=2) + "\n")


def student_files(spec: str | os.PathLike) -> tuple[Path, Path]:
    """(config, weights) of a student spec; one line when the run folder holds none (checked before long work)."""
    from zsd import open_clip_folder

    run_dir, prefix = student_location(spec)
    if not prefix and open_clip_folder.is_open_clip_folder(run_dir):  # `zsd export --format open_clip` wrote it
        return run_dir / open_clip_folder.CONFIG, run_dir / open_clip_folder.WEIGHTS
    cfg_path, w_path = run_dir / (prefix + CONFIG), run_dir / (prefix + WEIGHTS)
    if not cfg_path.is_file() or not w_path.is_file():
        hint = "runs trained with --ema-decay write it" if prefix else "pass a `zsd train` run folder"
        raise ZsdError(f"{run_dir} holds no {'EMA' if prefix else 'trained'} student ({cfg_path.name} and "
                       f"{w_path.name}); {hint}")
    return cfg_path, w_path


def load_student(spec: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Student, dict]:
    """Load a student from its run folder (or a file inside it); `RUN_DIR:ema` loads its EMA weights, and
    an open_clip folder that `zsd export --format open_clip` wrote loads the student it holds."""
    from safetensors.torch import load

    from zsd import open_clip_folder

    cfg_path, w_path = student_files(spec)
    exported = cfg_path.name == open_clip_folder.CONFIG
    # The weights are read once, and hashed from the bytes loaded: a trainer that renames a new
    # checkpoint into place meanwhile cannot make the student's caches name other weights.
    try:
        config = open_clip_folder.read_record(cfg_path.parent) if exported else json.loads(cfg_path.read_text())
        config["preprocess"] = eval_preprocess(config).to_dict()
        model = Student(config["student"], config["embed_dim"], config["preprocess"]["size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ZsdError(f"{cfg_path} is damaged or not a zsd student config ({type(e).__name__}: {e})") from None
    try:
        data = w_path.read_bytes()
        state = load(data)
        model.load_state_dict(open_clip_folder.student_state(state, model) if exported else state)
    except ZsdError:
        raise
    except Exception as e:  # safetensors' header errors, a state of another student
        raise ZsdError(f"{w_path} is damaged or does not fit {cfg_path.name} "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    config["weights_sha256"] = hashlib.sha256(data).hexdigest()
    return model.to(device).eval(), config


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def student_fingerprint(spec: str | os.PathLike, config: dict) -> dict:
    """A student in the teacher-fingerprint shape, for stores of student embeddings: its weights'
    hash is that of the bytes `load_student` loaded (`config["weights_sha256"]`)."""
    from zsd.teachers import file_sha256

    weights = config.get("weights_sha256") or file_sha256(student_files(spec)[1])  # the loaded bytes' hash
    return {"backend": "zsd-student", "model": config["student"],
            "weights": "sha256:" + weights, "preprocess": config["preprocess"],
            "dim": config["embed_dim"], "distilled_from": config.get("teacher_id")}
