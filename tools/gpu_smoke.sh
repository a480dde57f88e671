#!/usr/bin/env bash
# GPU smoke test and throughput check on one CUDA device, <= 8 minutes, nothing downloaded.
#
#   tools/gpu_smoke.sh [--images N] [--student NAME] [--device cuda:N]
#
# Generates webdataset shards of random 256x256 JPEGs, then prints, each next to the model alone:
#   teacher pass  `cache-teacher` img/s of ViT-B-32 (random weights, saved to a checkpoint file) in bf16,
#                 vs the teacher's forward on pre-loaded normalised tensors on the GPU;
#   training      `zsd train` img/s (efficientnet_b0 at 224 px, bf16, every sample decoded: --pixel-cache no),
#                 vs the student's forward + backward + step on pre-loaded tensors.
# A ratio near 1 means the data path keeps the GPU busy. Without a CUDA device: one `zsd: error:` line, exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 python - "$@" <<'EOF'
import argparse, io, json, os, sys, tarfile, tempfile, time
from pathlib import Path

import torch

ap = argparse.ArgumentParser(prog="tools/gpu_smoke.sh")
ap.add_argument("--images", type=int, default=8192)
ap.add_argument("--student", default="efficientnet_b0")
ap.add_argument("--device", default="cuda")
args = ap.parse_args()
if not torch.cuda.is_available():
    print("zsd: error: tools/gpu_smoke.sh needs a CUDA device and torch sees none "
          f"(torch {torch.__version__}, CUDA build {torch.version.cuda})", file=sys.stderr)
    sys.exit(1)

import numpy as np
import open_clip
import timm
from PIL import Image

from zsd.cache import cache_teacher
from zsd.train import TrainConfig, train
from zsd.views import normalize

dev = torch.device(args.device)
workers = max(1, min(16, (os.cpu_count() or 2) - 1))
root = Path(tempfile.mkdtemp(prefix="zsd_gpu_smoke_"))
print(f"{torch.cuda.get_device_name(dev)}, {os.cpu_count()} cores ({workers} loader workers), "
      f"torch {torch.__version__}, {args.images} images, work folder {root}", flush=True)


def timed(fn, n_iter, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(n_iter):
        fn()
    torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


# 1. shards: random 256x256 JPEGs, 1,024 per shard
t0 = time.perf_counter()
rng = np.random.default_rng(0)
(root / "shards").mkdir()
for s in range(-(-args.images // 1024)):
    with tarfile.open(root / "shards" / f"{s:05d}.tar", "w") as tar:
        for i in range(s * 1024, min(args.images, (s + 1) * 1024)):
            buf = io.BytesIO()
            small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # smooth content: realistic JPEG sizes
            Image.fromarray(small).resize((256, 256), Image.BILINEAR).save(buf, "JPEG", quality=90)
            for ext, data in ((".jpg", buf.getvalue()), (".json", json.dumps({"uid": f"u{i}"}).encode())):
                info = tarfile.TarInfo(f"{i:08d}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
print(f"shards written in {time.perf_counter() - t0:.0f} s", flush=True)

# 2. teacher: ViT-B-32 with random weights, from a checkpoint file (zsd refuses a teacher without weights)
torch.manual_seed(0)
ckpt = root / "vit_b_32_random.pt"
torch.save(open_clip.create_model("ViT-B-32").state_dict(), ckpt)
store = root / "store.zarr"
s = cache_teacher([str(root / "shards")], str(store), teacher="ViT-B-32", pretrained=str(ckpt), precision="bf16",
                  device=str(dev), workers=workers, progress=False, log=lambda m: None)
teacher_pass = s["images_per_s"]
model = open_clip.create_model("ViT-B-32", pretrained=str(ckpt), device=dev).eval()
x = normalize(torch.randint(0, 256, (256, 3, 224, 224), dtype=torch.uint8, device=dev), (0.48, 0.46, 0.41),
              (0.27, 0.26, 0.28))
with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
    teacher_raw = 256 * 20 / timed(lambda: model.encode_image(x), 20)

print(f"teacher pass  {teacher_pass:8.0f} img/s   raw forward {teacher_raw:8.0f} img/s   "
      f"ratio {teacher_pass / teacher_raw:.2f}   (ViT-B-32 bf16, batch 256, phases {s['phases_s']})", flush=True)

# 3. student training, every sample decoded again (the DataComp-scale path)
batch = 256
steps = max(20, 3 * args.images // batch)
r = train(TrainConfig([str(store)], run_dir=str(root / "run"), student=args.student, student_res=224, steps=steps,
                      batch_size=batch, workers=workers, device=str(dev), precision="bf16", pixel_cache="no"),
          progress=False, log=lambda m: None)
student = timm.create_model(args.student, num_classes=512).to(dev).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
xs = torch.randn(batch, 3, 224, 224, device=dev).to(memory_format=torch.channels_last)
t = torch.nn.functional.normalize(torch.randn(batch, 512, device=dev), dim=-1)


def step():
    with torch.autocast("cuda", torch.bfloat16):
        loss = (1 - torch.nn.functional.cosine_similarity(student(xs).float(), t)).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


student_raw = batch * 20 / timed(step, 20)
print(f"training      {r['images_per_s']:8.0f} img/s   raw fwd+bwd {student_raw:8.0f} img/s   "
      f"ratio {r['images_per_s'] / student_raw:.2f}   ({args.student} 224 px bf16, batch {batch}, {steps} steps, "
      "--pixel-cache no)", flush=True)
EOF
