"""Students: a timm backbone without its classifier plus one linear projection to the teacher's dim.

A trained student is two files in its run folder: `student.safetensors` (weights) and
`student.json` (what it is: timm name, embedding dim, input preprocessing, the teacher it was
distilled from, training config), so `load_student(RUN_DIR)` rebuilds it with one call. A run
trained with an EMA of its weights also holds `ema_student.safetensors` + `ema_student.json`;
the student spec `RUN_DIR:ema` names that one wherever a student is taken (load_student, eval,
coverage). An open_clip folder that `zsd export --format open_clip` wrote is a student too: its config
records the student as `student.json` does, and its image tower holds the student's weights.

Every command resolves a student spec once (`resolve_student`) and passes the `StudentRef` on.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from zsd.errors import ZsdError, atomic_file
from zsd.hub import offline_unless_reachable
from zsd.store import lock_holder
from zsd.teachers import exact_fp32, file_sha256
from zsd.views import Preprocess, timm_preprocess

WEIGHTS, CONFIG = "student.safetensors", "student.json"
EMA_PREFIX = "ema_"  # the EMA student's files: ema_student.safetensors, ema_student.json
# An exported open_clip folder (zsd.open_clip_folder writes it): its files and the format of its zsd record.
OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
OPEN_CLIP_FORMAT = "zsd-open_clip/1"


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
        """Unit embeddings, in fp32 that is fp32 on a GPU too (no TF32), like the teacher's fp32 pass:
        a student's cached embeddings of a store are one computation on a CPU and a GPU (they differ
        by summation order, ~1e-6), so eval reuses them across devices."""
        with exact_fp32():
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


@dataclass(frozen=True)
class StudentRef:
    """A student spec resolved: where its files are and which form it has. Commands resolve `--student`
    once and pass this on; every function that takes a spec also takes one."""

    spec: str  # as given: results and messages name the student by it
    folder: Path  # the run folder, or the exported open_clip folder
    kind: str  # "run", "ema" (RUN_DIR:ema) or "open_clip"
    prefix: str  # of its files in the run folder, and of its embedding stores: "" or "ema_"
    config_file: Path
    weights_file: Path

    def __str__(self) -> str:
        return self.spec


def resolve_student(spec: str | os.PathLike | StudentRef) -> StudentRef:
    """RUN_DIR or a file in it, RUN_DIR:ema for its EMA, or an exported open_clip folder; one line when the
    folder holds no student (checked before long work)."""
    if isinstance(spec, StudentRef):
        return spec
    text = str(spec)
    if text.endswith(":ema"):
        folder, prefix = Path(text[:-len(":ema")]), EMA_PREFIX
    elif Path(text).is_file():  # student.json or ema_student.safetensors, ...: the prefix is in the name
        folder, prefix = Path(text).parent, Path(text).name.removesuffix(CONFIG).removesuffix(WEIGHTS)
    else:
        folder, prefix = Path(text), ""
    if not prefix and (folder / OPEN_CLIP_CONFIG).is_file():  # `zsd export --format open_clip` wrote it
        return StudentRef(text, folder, "open_clip", "", folder / OPEN_CLIP_CONFIG, folder / OPEN_CLIP_WEIGHTS)
    cfg_path, w_path = folder / (prefix + CONFIG), folder / (prefix + WEIGHTS)
    if not cfg_path.is_file() or not w_path.is_file():
        hint = "runs trained with --ema-decay write it" if prefix else "pass a `zsd train` run folder"
        raise ZsdError(f"{folder} holds no {'EMA' if prefix else 'trained'} student ({cfg_path.name} and "
                       f"{w_path.name}); {hint}")
    return StudentRef(text, folder, "ema" if prefix else "run", prefix, cfg_path, w_path)


def read_record(folder: str | os.PathLike) -> dict:
    """The zsd record of an exported open_clip folder: what `student.json` holds for a run."""
    folder = Path(folder)
    try:
        record = json.loads((folder / OPEN_CLIP_CONFIG).read_text()).get("zsd")
    except (OSError, ValueError, AttributeError) as e:
        raise ZsdError(f"cannot read {folder / OPEN_CLIP_CONFIG} ({e})") from None
    if not isinstance(record, dict) or record.get("format") != OPEN_CLIP_FORMAT:
        raise ZsdError(f"{folder} is an open_clip folder that `zsd export --format open_clip` did not write (no zsd "
                       "record of its teacher in open_clip_config.json), so zsd cannot check it against a test store")
    return record


def student_config(spec: str | os.PathLike | StudentRef) -> dict:
    """What the student is (its student.json, or an exported folder's record), without reading its weights;
    a record whose sizes cannot be a student's (`config_problem`) is damaged."""
    ref = resolve_student(spec)
    if ref.kind == "open_clip":
        config = read_record(ref.folder)
    else:
        try:
            config = json.loads(ref.config_file.read_text())
            if not isinstance(config, dict):
                raise TypeError("not a JSON object")
        except (OSError, ValueError, TypeError) as e:
            raise _damaged(ref, e) from None
    problem = config_problem(config)
    if problem:
        fix = ("export it again" if ref.kind == "open_clip" else
               "rerun its `zsd train ... --resume`, which writes it again from train_state.pt"
               if (ref.folder / "train_state.pt").is_file() else "restore it from a copy")
        raise ZsdError(f"{ref.config_file} is damaged: {problem}; {fix}")
    return config


MAX_RESOLUTION = 8192  # pixels a side: beyond it a size is garbled (a 10^9 px input allocates until memory ends)


def config_problem(config: dict) -> str | None:
    """Why a student's record (student.json, or the student of a training state) cannot be one, or None:
    sizes that are no whole numbers in range, a mean or std that is not 3 numbers (std > 0)."""
    pre = config.get("preprocess")
    if not isinstance(pre, dict):
        return "it has no preprocess record"
    for name, value, top in (("embed_dim", config.get("embed_dim"), 1 << 20), ("preprocess size", pre.get("size"),
                             MAX_RESOLUTION), ("preprocess resize", pre.get("resize"), 2 * MAX_RESOLUTION)):
        if type(value) is not int or not 1 <= value <= top:
            return f"its {name} is {value!r}, not a whole number in 1..{top}"
    for name, low in (("mean", -math.inf), ("std", 0)):
        v = pre.get(name)
        if not (isinstance(v, list) and len(v) == 3 and all(type(x) in (int, float) and low < x < math.inf for x in v)):
            return f"its preprocess {name} is {v!r}, not 3 numbers" + (" above 0" if low == 0 else "")
    return None


def _damaged(ref: StudentRef, e: Exception) -> ZsdError:
    return ZsdError(f"{ref.config_file} is damaged or not a zsd student config ({type(e).__name__}: {e})")


def student_state(folder_state: dict[str, torch.Tensor], student: Student) -> dict[str, torch.Tensor]:
    """An exported folder's image tower under the `Student`'s names: the inverse of
    `zsd.open_clip_folder.visual_state`."""
    trunk = {k[len("visual.trunk."):]: v for k, v in folder_state.items() if k.startswith("visual.trunk.")}
    own = set(student.backbone.state_dict())
    head = sorted(set(trunk) - own)
    if [k.rsplit(".", 1)[-1] for k in head] != ["bias", "weight"]:
        raise ZsdError(f"the folder's image tower is not a {student.name} student with one projection "
                       f"({len(head)} tensors outside its backbone)")
    state = {f"backbone.{k}": v for k, v in trunk.items() if k in own}
    state.update({f"proj.{k.rsplit('.', 1)[-1]}": trunk[k] for k in head})
    return state


def load_student(spec: str | os.PathLike | StudentRef, device: str | torch.device = "cpu") -> tuple[Student, dict]:
    """Load a student from its run folder (or a file inside it); `RUN_DIR:ema` loads its EMA weights, and
    an open_clip folder that `zsd export --format open_clip` wrote loads the student it holds."""
    from safetensors.torch import load

    ref = resolve_student(spec)
    config = student_config(ref)
    try:
        config["preprocess"] = eval_preprocess(config).to_dict()
        model = Student(config["student"], config["embed_dim"], config["preprocess"]["size"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _damaged(ref, e) from None
    # The weights are read once, and hashed from the bytes loaded: a trainer that renames a new
    # checkpoint into place meanwhile cannot make the student's caches name other weights.
    try:
        data = ref.weights_file.read_bytes()
        state = load(data)
        model.load_state_dict(student_state(state, model) if ref.kind == "open_clip" else state)
    except ZsdError:
        raise
    except Exception as e:  # safetensors' header errors, a state of another student
        raise ZsdError(f"{ref.weights_file} is damaged or does not fit {ref.config_file.name} "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    config["weights_sha256"] = hashlib.sha256(data).hexdigest()
    return model.to(device).eval(), config


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def steps_text(config: dict) -> str:
    """The step of these weights (a checkpoint records its own), of the run's total."""
    step, total = config.get("step"), config.get("total_steps")
    if step is None:
        return f"{total} (the run's total; the weights' own step is not recorded)" if total else "not recorded"
    return f"{step} of {total}" if total and total != step else str(step)


def still_training(ref: StudentRef, config: dict) -> str | None:
    """One warning line when a trainer holds the run folder's lock: its student files are a checkpoint
    that the next one replaces."""
    holder = lock_holder(ref.folder) if ref.kind != "open_clip" else None
    if holder is None:
        return None
    return (f"warning: {ref.folder} is still being trained by {holder}: these are the weights of its checkpoint at "
            f"step {steps_text(config)}; export again when the run ends")


def student_fingerprint(spec: str | os.PathLike | StudentRef, config: dict) -> dict:
    """A student in the teacher-fingerprint shape, for stores of student embeddings: its weights'
    hash is that of the bytes `load_student` loaded (`config["weights_sha256"]`)."""
    weights = config.get("weights_sha256") or file_sha256(resolve_student(spec).weights_file)
    return {"backend": "zsd-student", "model": config["student"],
            "weights": "sha256:" + weights, "preprocess": config["preprocess"],
            "dim": config["embed_dim"], "distilled_from": config.get("teacher_id"),
            "precision": "fp32"}  # encode_images' (fp32 is teacher_id's reference: the hash is as before)
