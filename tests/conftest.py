import json
import os

import numpy as np
import pytest
from PIL import Image

# Tests never reach a model hub: everything they load they build and save themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests run on the CPU, also on a GPU machine: a library default of device="auto" would pick CUDA there.
# Set before torch first looks for GPUs; inherited by the processes tests start. The CUDA tests
# (`ZSD_TEST_CUDA=1 pytest -k cuda`, run by tools/gpu_smoke.sh) keep the GPUs visible.
if os.environ.get("ZSD_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402  (only now: after CUDA_VISIBLE_DEVICES)

# One intra-op thread in every test, whichever test files run: a result never depends on which
# modules were collected, and the DDP tests' single-process references sum in the order of their
# subprocess ranks (OMP_NUM_THREADS=1).
torch.set_num_threads(1)

# A ViT small enough to run a few hundred 32 px images per second on one core.
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path_factory, monkeypatch):
    """Bare store names, classifiers and pixel caches go to a fresh folder, never the checkout's cache/."""
    monkeypatch.setenv("ZSD_CACHE", str(tmp_path_factory.mktemp("zsd_cache")))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised open_clip model saved as a local-dir: folder (config + weights)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    (d / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP_CFG,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                           "resize_mode": "shortest"},
    }))
    return d


@pytest.fixture(scope="session")
def tiny_teacher_name(tiny_clip_dir):
    return f"local-dir:{tiny_clip_dir}"


FAKE_TEACHER = {"backend": "test", "model": "random", "weights": "none", "dim": 16,
                "preprocess": {"size": 32, "resize": 32, "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
                               "std": [0.5, 0.5, 0.5], "resize_mode": "shortest"}}


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_store(path, emb, labels=None, classnames=(), teacher=FAKE_TEACHER, failed=(), chunk_rows=8):
    """A store holding the given (N, D) or (N, views, D) embeddings (as fp16), some rows marked failed."""
    from zsd.store import FAILED, WRITTEN, create_store
    from zsd.teachers import teacher_id

    emb = emb[:, None, :] if emb.ndim == 2 else emb
    n, views, d = emb.shape
    store = create_store(path, keys=[f"img{i:05d}" for i in range(n)],
                         labels=labels if labels is not None else np.full(n, -1), locs=np.zeros((n, 4)), views=views,
                         dim=d, teacher=teacher, teacher_id=teacher_id(teacher), classnames=list(classnames),
                         sources=[], chunk_rows=chunk_rows)
    status = np.full(n, WRITTEN, np.uint8)
    status[list(failed)] = FAILED
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        box = np.tile(np.array([0, 0, 1, 1, 0], np.int32), (sl.stop - sl.start, views, 1))  # a 1-pixel crop
        store.write_chunk(c, emb[sl], box, ["" if s == WRITTEN else "failed in a test" for s in status[sl]],
                          status[sl])
    return store


@pytest.fixture
def resnet_checkpoint(tmp_path):
    """A checkpoint file of timm's test_resnet: a teacher that is rebuilt only from --pretrained FILE."""
    import timm
    import torch

    torch.manual_seed(0)
    path = tmp_path / "resnet.pt"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    return path


def cli(args, capsys):
    """(exit code, stdout, stderr) of `zsd ARGS` run in this process."""
    from zsd.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def make_image(path, seed, size=(48, 40), mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def image_folder(tmp_path):
    """ImageFolder layout: 3 classes x 4 images of varied sizes."""
    root = tmp_path / "imgs"
    for c, name in enumerate(["cat", "dog", "fish_tank"]):
        for i in range(4):
            make_image(root / name / f"{name}_{i}.jpg" if i % 2 else root / name / f"{name}_{i}.png",
                       seed=10 * c + i, size=(40 + 4 * i, 36 + 3 * c))
    return root


@pytest.fixture
def store(image_folder, tmp_path, tiny_teacher_name):
    """The path of a complete 1-view store of `image_folder` with the tiny teacher."""
    from zsd.cache import cache_teacher

    cache_teacher([str(image_folder)], str(tmp_path / "s.zarr"), teacher=tiny_teacher_name, pretrained=None,
                  views=1, chunk_rows=4, workers=0, progress=False, log=lambda m: None)
    return str(tmp_path / "s.zarr")
