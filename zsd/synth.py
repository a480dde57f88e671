"""Generate synthetic training images from a prompt file with a diffusion model.

Default: SDXL base with the LCM-LoRA, 6 steps, guidance 0.5 (the paper's settings). Each image
has its own seed and its own torch.Generator, so any image can be regenerated alone. Output:

    DIR/images/<label:05d>/<class-slug>_<seed>.png
    DIR/manifest.jsonl     {"image", "class", "label", "prompt", "seed"} per line, image relative to DIR

An image is written to a temporary file and renamed, and only then gets its manifest line, so
the manifest lists fully written images only; a rerun skips them. With several shards (torchrun
ranks or --num-shards), shard i takes prompts i, i+N, ... and writes manifest-<i>-of-<N>.jsonl;
whichever shard finds all parts complete merges them into manifest.jsonl in prompt order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from zsd.dist import local_device, shard
from zsd.errors import ZsdError, atomic_file, writing_in
from zsd.hub import load_local_or_hub, require_extra
from zsd.prompts import read_prompts

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
LCM_LORA_SDXL = "latent-consistency/lcm-lora-sdxl"
# the ablation's alternative: SD-1.5 ("stable-diffusion-v1-5/stable-diffusion-v1-5") with "latent-consistency/lcm-lora-sdv1-5"
MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class SynthSettings:
    model: str = SDXL
    lora: str | None = LCM_LORA_SDXL
    steps: int = 6
    guidance: float = 0.5
    size: int = 1024
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"


def image_path(prompt: dict) -> str:
    """Where a prompt's image goes, relative to the output directory."""
    slug = re.sub(r"[^a-z0-9]+", "_", prompt["class"].lower()).strip("_") or "class"
    return f"images/{int(prompt['label']):05d}/{slug}_{int(prompt['seed'])}.png"


def _resolve(device: str, dtype: str):
    import torch

    device = str(local_device(device))  # torchrun: one GPU per process, made current
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def load_pipeline(settings: SynthSettings):
    require_extra("synth", "diffusers", "transformers", "compel")
    from diffusers import AutoPipelineForText2Image, LCMScheduler

    device, dtype = _resolve(settings.device, settings.dtype)
    pipe = load_local_or_hub(lambda n, **kw: AutoPipelineForText2Image.from_pretrained(n, dtype=dtype, **kw),
                             settings.model, "--model", "diffusion model")
    if settings.lora:
        if importlib.util.find_spec("peft") is None:  # diffusers loads LoRAs through peft
            raise ZsdError("Loading a LoRA needs the peft package; pip install 'zsd[synth]' (or peft), or pass --lora none.")
        load_local_or_hub(lambda n, **kw: pipe.load_lora_weights(n, **kw) or pipe, settings.lora,
                          "--lora none, or --lora", "LoRA")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class WeightedPromptEncoder:
    """compel turns '(text)1.2' weights into prompt embeddings (SDXL: both text encoders, plus
    the pooled embedding of the second)."""

    def __init__(self, pipe):
        from compel import CompelForSD, CompelForSDXL

        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.compel = (CompelForSDXL if self.sdxl else CompelForSD)(pipe, device=pipe.device)

    def __call__(self, prompts: list[str]) -> dict:
        conditioning = self.compel(prompts)
        embeds = {"prompt_embeds": conditioning.embeds}
        if self.sdxl:
            embeds["pooled_prompt_embeds"] = conditioning.pooled_embeds
        return embeds


def generate_images(pipe, prompts: list[dict], settings: SynthSettings, encode=None):
    """PIL images for a batch of prompts, one generator per image seeded with its seed."""
    import torch

    encode = encode or WeightedPromptEncoder(pipe)
    generators = [torch.Generator("cpu").manual_seed(int(p["seed"])) for p in prompts]
    with torch.inference_mode():
        embeds = encode([p["prompt"] for p in prompts])
        return pipe(**embeds, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                    height=settings.size, width=settings.size, generator=generators).images


def _read_manifest(path: Path, out: Path) -> list[dict]:
    """Entries whose image exists; a line cut short by a crash is dropped."""
    entries = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (out / entry["image"]).is_file():
                entries.append(entry)
    return entries


def _write_lines(path: Path, entries: list[dict]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")


def synthesize(prompts_path: str | Path, out: str | Path, settings: SynthSettings = SynthSettings(),
               shard_index: int | None = None, num_shards: int | None = None, pipe=None) -> Path | None:
    """Generate the images of one shard; returns the merged manifest once all shards are done."""
    out = Path(out)
    prompts = read_prompts(prompts_path)
    paths = [image_path(p) for p in prompts]
    if len(set(paths)) != len(paths):
        raise ZsdError(f"{prompts_path} has two prompts of one class with the same seed; give every prompt its own seed.")
    num_shards, shard_index = shard(num_shards, shard_index)

    part = out / (MANIFEST if num_shards == 1 else f"manifest-{shard_index:05d}-of-{num_shards:05d}.jsonl")
    done = _read_manifest(part, out)
    done_paths = {e["image"] for e in done}
    todo = [i for i in range(shard_index, len(prompts), num_shards) if paths[i] not in done_paths]
    if todo:  # before anything is written: a model that does not load leaves no output folder behind
        pipe = pipe or load_pipeline(settings)
    out.mkdir(parents=True, exist_ok=True)
    _write_lines(part, done)  # drop entries of vanished images and any truncated line

    if todo:
        encode = WeightedPromptEncoder(pipe)
        with writing_in(out), open(part, "a", encoding="utf-8") as manifest, \
                tqdm(total=len(todo), desc="synth", unit="img") as bar:
            for start in range(0, len(todo), settings.batch_size):
                batch = todo[start:start + settings.batch_size]
                for i, image in zip(batch, generate_images(pipe, [prompts[i] for i in batch], settings, encode)):
                    target = out / paths[i]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_file(target) as tmp:
                        image.save(tmp, format="PNG")
                    p = prompts[i]
                    manifest.write(json.dumps({"image": paths[i], "class": p["class"], "label": int(p["label"]),
                                               "prompt": p["prompt"], "seed": int(p["seed"])}, ensure_ascii=False) + "\n")
                manifest.flush()
                os.fsync(manifest.fileno())
                bar.update(len(batch))
    return merge_manifests(out, prompts_path, num_shards)


def merge_manifests(out: str | Path, prompts_path: str | Path, num_shards: int) -> Path | None:
    """manifest.jsonl in prompt order once every prompt has an image; None while some are missing."""
    out = Path(out)
    order = {image_path(p): i for i, p in enumerate(read_prompts(prompts_path))}
    parts = [out / MANIFEST] if num_shards == 1 else \
        [out / f"manifest-{i:05d}-of-{num_shards:05d}.jsonl" for i in range(num_shards)]
    entries = {e["image"]: e for part in parts for e in _read_manifest(part, out) if e["image"] in order}
    if len(entries) < len(order):
        return None
    _write_lines(out / MANIFEST, sorted(entries.values(), key=lambda e: order[e["image"]]))
    return out / MANIFEST
