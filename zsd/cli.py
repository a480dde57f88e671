"""Command line: a thin layer over the library; every command maps onto one library call."""

from __future__ import annotations

import sys

import click

from zsd import __version__
from zsd.errors import ZsdError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
@click.option("--device", default="auto", show_default=True, help="torch device for the LLM.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
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
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the design, the per-class relabelling and the image seeds (prompt i gets seed + i).")
def prompts_cmd(recipe, options_path, out, seed):
    """Combine options pairwise into weighted prompts (one covering array per class).

    Without RECIPE, classes and dimensions come from the options file and all weights are 1.
    """
    from zsd.options import load_options
    from zsd.prompts import build_prompts, write_prompts
    from zsd.recipes import load_recipe

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
@click.option("--device", default="auto", show_default=True, help="torch device (auto: cuda if available).")
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


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="zsd", standalone_mode=False)
    except ZsdError as e:
        click.echo(f"zsd: error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("zsd: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
