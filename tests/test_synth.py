import json

import numpy as np
import pytest
from PIL import Image

from zsd.cli import main
from zsd.prompts import write_prompts
from zsd.synth import SynthSettings, generate_images, image_path, load_pipeline, synthesize

SIZE = 32  # pixels; the tiny VAE halves it once


def _clip_tokenizer(path):
    """A CLIPTokenizer over single characters (no merges): enough vocabulary for any prompt."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77), len(vocab)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A randomly initialised SDXL pipeline with an LCM scheduler, saved like a hub model."""
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("tiny-sdxl")
    torch.manual_seed(0)
    tokenizer, vocab_size = _clip_tokenizer(root / "tok")
    text_config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=16,
                                 num_attention_heads=2, num_hidden_layers=2, vocab_size=vocab_size, projection_dim=16)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 4 + 16, cross_attention_dim=32, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=SIZE)
    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=LCMScheduler(), tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config))
    pipe.save_pretrained(root / "model")
    return root / "model"


PROMPTS = [{"class": c, "label": label, "prompt": f"A photo of a ({c})1.5, (on a beach)0.1, 10:00 AM", "seed": seed}
           for seed, (label, c) in enumerate([(0, "cat"), (1, "Dog (small)"), (0, "cat"), (1, "Dog (small)"), (0, "cat")])]


def _settings(model, **kw):
    return SynthSettings(model=str(model), lora=None, steps=2, size=SIZE, batch_size=2, device="cpu", **kw)


def _manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_synth_command_writes_images_and_the_manifest_cache_teacher_reads(tiny_sdxl, tmp_path, tiny_teacher_name):
    write_prompts(PROMPTS, tmp_path / "prompts.jsonl")
    out = tmp_path / "synth"
    main(["synth", str(tmp_path / "prompts.jsonl"), "--out", str(out), "--model", str(tiny_sdxl), "--lora", "none",
          "--steps", "2", "--size", str(SIZE), "--batch-size", "2", "--device", "cpu"])
    entries = _manifest(out)
    assert [set(e) for e in entries] == [{"image", "class", "label", "prompt", "seed"}] * 5
    assert [(e["class"], e["label"], e["prompt"], e["seed"]) for e in entries] == \
        [(p["class"], p["label"], p["prompt"], p["seed"]) for p in PROMPTS]
    assert entries[1]["image"] == "images/00001/dog_small_1.png"
    for e in entries:
        with Image.open(out / e["image"]) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert not list(out.rglob("*.tmp"))
    # ... and zsd cache-teacher reads the manifest: keys, labels and class names come through.
    from zsd.cache import cache_teacher
    from zsd.store import open_store
    cache_teacher([str(out / "manifest.jsonl")], str(tmp_path / "synth.zarr"), teacher=tiny_teacher_name,
                  pretrained=None, workers=0, progress=False, log=lambda m: None)
    store = open_store(tmp_path / "synth.zarr")
    assert store.complete() and list(store.keys()) == [e["image"] for e in entries]
    assert list(store.labels()) == [e["label"] for e in entries]
    assert all(store.classnames[e["label"]] == e["class"] for e in entries)


def test_any_image_can_be_regenerated_alone(tiny_sdxl):
    settings = _settings(tiny_sdxl)
    pipe = load_pipeline(settings)
    batch = generate_images(pipe, PROMPTS[:3], settings)
    alone = generate_images(pipe, PROMPTS[2:3], settings)[0]
    np.testing.assert_allclose(np.asarray(alone, dtype=float), np.asarray(batch[2], dtype=float), atol=2)
    assert np.abs(np.asarray(batch[0], dtype=float) - np.asarray(batch[2], dtype=float)).mean() > 1  # seeds matter


def test_rerun_after_interruption_generates_only_what_is_missing(tiny_sdxl, tmp_path):
    write_prompts(PROMPTS, tmp_path / "prompts.jsonl")
    out = tmp_path / "synth"
    settings = _settings(tiny_sdxl)
    pipe = load_pipeline(settings)
    synthesize(tmp_path / "prompts.jsonl", out, settings, pipe=pipe)
    first = _manifest(out)
    before = {e["image"]: (out / e["image"]).stat().st_mtime_ns for e in first}
    # simulate a crash: one image never renamed into place, a manifest line cut short
    (out / first[3]["image"]).unlink()
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])

    class Counting:
        calls = []

        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, **kw):
            self.calls.append(len(kw["generator"]))
            return pipe(**kw)

    counting = Counting()
    synthesize(tmp_path / "prompts.jsonl", out, settings, pipe=counting)
    assert counting.calls == [2]  # image 3 (deleted) and image 4 (its line was cut short)
    assert _manifest(out) == first
    assert all((out / e["image"]).stat().st_mtime_ns == before[e["image"]] for e in first[:3])


def test_a_full_disk_is_one_line_and_the_rerun_finishes(tiny_sdxl, tmp_path, monkeypatch, capsys):
    from conftest import cli
    from test_write_errors import FullDisk

    write_prompts(PROMPTS, tmp_path / "prompts.jsonl")
    out = tmp_path / "synth"
    args = ["synth", str(tmp_path / "prompts.jsonl"), "--out", str(out), "--model", str(tiny_sdxl), "--lora", "none",
            "--steps", "2", "--size", str(SIZE), "--batch-size", "2", "--device", "cpu"]
    disk, real_save, saved = FullDisk(monkeypatch, out), Image.Image.save, []

    def save_then_fill(self, fp, *a, **k):  # the disk fills after the second image
        real_save(self, fp, *a, **k)
        saved.append(fp)
        if len(saved) == 2:
            disk.fill()

    monkeypatch.setattr(Image.Image, "save", save_then_fill)
    code, _, err = cli(args, capsys)
    err = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "|" not in line]
    assert code == 1 and len(err) == 1 and err[0].startswith(f"zsd: error: No space left on device ({out}")
    assert len(_manifest(out)) == 1 and not list(out.rglob("*.tmp"))  # the second image's line found no room
    monkeypatch.undo()
    main(args)
    assert [e["seed"] for e in _manifest(out)] == [p["seed"] for p in PROMPTS] and not list(out.rglob("*.tmp"))
    assert all((out / e["image"]).is_file() for e in _manifest(out))


def test_shards_split_the_prompts_and_the_last_one_merges(tiny_sdxl, tmp_path):
    write_prompts(PROMPTS, tmp_path / "prompts.jsonl")
    out = tmp_path / "synth"
    settings = _settings(tiny_sdxl)
    pipe = load_pipeline(settings)
    assert synthesize(tmp_path / "prompts.jsonl", out, settings, shard_index=1, num_shards=2, pipe=pipe) is None
    part = [json.loads(x) for x in (out / "manifest-00001-of-00002.jsonl").read_text().splitlines()]
    assert [e["seed"] for e in part] == [1, 3]
    assert synthesize(tmp_path / "prompts.jsonl", out, settings, shard_index=0, num_shards=2, pipe=pipe) == out / "manifest.jsonl"
    assert [e["seed"] for e in _manifest(out)] == [0, 1, 2, 3, 4]
    assert image_path(PROMPTS[4]) == _manifest(out)[4]["image"]


def test_missing_model_fails_at_once_with_one_sentence(tmp_path, capsys):
    write_prompts(PROMPTS, tmp_path / "prompts.jsonl")
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("zsd: error: Cannot load the diffusion model") and "\n" not in err
