"""The forward alone, side by side, interleaved in one run (images decoded once; compile and
first-call warm-up excluded). Three modes:

- ``engines`` (default): ddscore-jax's JAX engine (``ZooForward``, XLA), its onnxruntime engine
  (``ZooForward(engine="onnxruntime")``, the graph built from the zoo's own parameters), torch
  eager on the same truncated network, and onnxruntime on torch's own ONNX export of it (the
  reference an onnxruntime engine must at least match). The onnxruntime sides form a 2 x 2: our
  graph or torch's export, each under the engine's session options (no spinning, one shared
  arena) and onnxruntime's defaults, so a difference is put down to the graph or to the options;
  each pair's per-repeat ratios are printed. Features are checked equal to torch's before any
  speed is quoted.
- ``xla-flags``: the JAX engine under several ``XLA_FLAGS`` (they are read once per process, so
  each runs in its own child process; children alternate, A B C A B C ...), against the
  onnxruntime engine in a child of its own.
- ``strategies``: loop over models vs stacked vmap, float32 vs bfloat16 (JAX engine), and what
  ``--dtype bfloat16`` does to the features and to the score.

    python benchmarks/bench_forward.py engines --arch resnet18 --batch-size 32 --repeats 5
    python benchmarks/bench_forward.py xla-flags --repeats 3 --xla= \\
        --xla=--xla_cpu_experimental_ynn_fusion_type=+eltwise \\
        --xla=--xla_cpu_multi_thread_eigen=false
    python benchmarks/bench_forward.py strategies --models 3 --batch-size 16 --repeats 3
"""

from __future__ import annotations

import _common  # noqa: F401 - first: it limits OpenBLAS's threads before NumPy loads it

# isort: split

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    Layer3,
    load_now,
    loaded_models,
    machine,
    make_dataset,
    median,
    timed,
    torch_models,
)

BLOCKS = ("layer3.0", "layer3.1")


def _images(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)


def _timed_cpu(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every thread of this process) of one call. On a contended
    machine the CPU time is the steadier measure of the work a side needs; the wall time is what
    a user waits."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return t1 - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def _default_session(proto):
    """onnxruntime's default session options (all graph optimisations, a spinning intra-op pool,
    an arena per session), threads = this process's CPUs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = len(os.sched_getaffinity(0))
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _torch_export_session(net, size: int, engine_options: bool = False):
    """onnxruntime on torch's own ONNX export of the truncated network (the reference):
    with onnxruntime's default session options, or (``engine_options``) with the ones the
    onnxruntime engine uses (``ort_engine.session``), so that graph meets graph alone."""
    import onnx
    import torch

    from ddscore_jax import ort_engine

    class Truncated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return tuple(Layer3(self.net, 1)(x))

    path = Path(tempfile.mkdtemp()) / "layer3.onnx"
    # Exporting puts the wrapper (and so ``net``) in its own train/eval mode afterwards: both eval.
    torch.onnx.export(Truncated().eval(), torch.zeros(2, 3, size, size), str(path),
                      input_names=["x"], dynamic_axes={"x": {0: "n"}}, dynamo=False)
    net.eval()
    proto = onnx.load(str(path))
    sess = ort_engine.session(proto) if engine_options else _default_session(proto)
    return lambda x: dict(zip(BLOCKS, sess.run(None, {"x": x}), strict=True))


def engines(args) -> None:
    import torch

    from ddscore_jax import ort_engine
    from ddscore_jax.forward import ZooForward

    nets = torch_models(args.models, args.arch)
    models = loaded_models(nets)
    x = _images(args.batch_size, args.image_size)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    truncated = [Layer3(n, 1) for n in nets]

    def torch_eager():
        with torch.inference_mode():
            return [dict(zip(BLOCKS, (o.numpy() for o in f(xt)), strict=True))
                    for f in truncated]

    exported = [_torch_export_session(n, args.image_size) for n in nets]
    # Our graph under onnxruntime's default options (its pool spins between operators): with
    # the two export sides, graph and session options are told apart (2 x 2).
    ours_default = [_default_session(ort_engine.build_graph(m.config, m.state_dict, m.blocks,
                                                            m.head)) for m in models]
    exported_same = [_torch_export_session(n, args.image_size, True) for n in nets]
    sides = {
        "jax engine (XLA)": ZooForward(models, engine="jax"),
        "onnxruntime engine": ZooForward(models, engine="onnxruntime"),
        "torch eager": lambda _x: torch_eager(),
        "onnxruntime engine's graph, default options":
            lambda x: [dict(zip(BLOCKS, f.run(None, {"images": x}), strict=True))
                       for f in ours_default],
        "onnxruntime, torch's export": lambda _x: [f(xt.numpy()) for f in exported],
        "onnxruntime, torch's export, engine options":
            lambda _x: [f(xt.numpy()) for f in exported_same],
    }
    start = f"machine: {machine()}"
    ref = torch_eager()
    print(start)
    print(f"{args.models} x {args.arch} to layer3[1], batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, torch threads {torch.get_num_threads()}")
    for name, fn in sides.items():
        out = fn(x)  # compile / warm up, and check before timing
        err = max(_rel(o[b], r[b]) for o, r in zip(out, ref, strict=True) for b in BLOCKS)
        print(f"  {name:30s} features vs torch eager: max rel err {err:.1e}")
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    loads = []
    for r in range(args.repeats):
        # Forwards and backwards in turn, so no side always runs right after the same one.
        for name, fn in list(sides.items())[:: -1 if r % 2 else 1]:
            loads.append(load_now())
            wall, c = _timed_cpu(lambda fn=fn: fn(x))
            times[name].append(wall)
            cpu[name].append(c)
    loads.append(load_now())
    _report(times, args.batch_size * args.models, loads, "jax engine (XLA)", cpu)
    # The target (docs/extraction.md) pair by pair: each repeat's two forwards ran side by side.
    for ours, ref_side in (
            ("onnxruntime engine", "onnxruntime, torch's export"),
            ("onnxruntime engine", "onnxruntime, torch's export, engine options"),
            ("onnxruntime engine's graph, default options", "onnxruntime, torch's export"),
            ("onnxruntime engine", "onnxruntime engine's graph, default options")):
        pairs = sorted(t / e for e, t in zip(times[ours], times[ref_side], strict=True))
        print(f"{ours} vs {ref_side}: median {median(pairs):.3f}x, per repeat "
              f"{pairs[0]:.3f}..{pairs[-1]:.3f}: " + " ".join(f"{p:.3f}" for p in pairs))


def _report(times: dict[str, list[float]], per_run: int, loads: list[float], base: str,
            cpu: dict[str, list[float]] | None = None) -> None:
    print(f"load average: at start {loads[0]:.2f}, median {median(loads):.2f}, max "
          f"{max(loads):.2f}, at end {loads[-1]:.2f} (2 cores: above ~1.5 other jobs were "
          "competing)")
    b = median(times[base])
    for name, v in times.items():
        print(f"  {name:44s} {per_run / median(v):7.1f} image-model/s  {b / median(v):5.2f}x "
              f"of {base.split(' (')[0]}   runs: " + " ".join(f"{per_run / t:.1f}" for t in v))
    if cpu:
        b = median(cpu[base])
        print("CPU time (all threads) per image-model, the work each side needs:")
        for name, v in cpu.items():
            print(f"  {name:44s} {1e3 * median(v) / per_run:7.1f} ms  "
                  f"({base.split(' (')[0]} needs {b / median(v):.2f}x this)")


def _child(args) -> None:
    """One side in a fresh process: print JSON {"times": [...], "err": ...}."""
    from ddscore_jax.forward import ZooForward

    nets = torch_models(args.models, args.arch)
    x = _images(args.batch_size, args.image_size)
    fwd = ZooForward(loaded_models(nets), engine=args.child)
    out = fwd(x)
    import torch

    with torch.inference_mode():
        ref = Layer3(nets[0], 1)(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    err = max(_rel(out[0][b], r.numpy()) for b, r in zip(BLOCKS, ref, strict=True))
    runs = [_timed_cpu(lambda: fwd(x)) for _ in range(args.child_runs)]
    print(json.dumps({"times": [w for w, _ in runs], "cpu": [c for _, c in runs], "err": err}))


def xla_flags(args) -> None:
    variants = {f"jax, XLA_FLAGS={f!r}": ("jax", f) for f in args.xla or [""]}
    variants["onnxruntime engine"] = ("onnxruntime", "")
    common = ["--arch", args.arch, "--models", str(args.models), "--batch-size",
              str(args.batch_size), "--image-size", str(args.image_size)]
    print(f"machine: {machine()}")
    print(f"{args.models} x {args.arch} to layer3[1], batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}; each side a fresh process timing "
          f"{args.child_runs} forwards after a warm-up, sides alternating")
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    loads = []
    for _ in range(args.repeats):
        for name, (engine, flags) in variants.items():
            env = {**os.environ, "XLA_FLAGS": flags}
            loads.append(load_now())
            res = subprocess.run([sys.executable, __file__, "child", "--child", engine,
                                  "--child-runs", str(args.child_runs), *common],
                                 env=env, capture_output=True, text=True, check=True)
            doc = json.loads(res.stdout.strip().splitlines()[-1])
            if doc["err"] > 1e-5:
                raise SystemExit(f"{name}: features differ from torch's ({doc['err']:.1e})")
            times[name] += doc["times"]
            cpu[name] += doc["cpu"]
    _report(times, args.batch_size * args.models, loads, next(iter(variants)), cpu)


def strategies(args) -> None:
    import jax

    from ddscore_jax import data
    from ddscore_jax.ddscore import score_models
    from ddscore_jax.forward import ZooForward, extract_features

    b, s = args.batch_size, args.image_size
    root = make_dataset(Path(tempfile.gettempdir()) / f"ddscore-bench-{args.score_images}",
                        args.score_images)
    ds = data.scan(root)
    models = loaded_models(torch_models(args.models, args.arch))
    images = data.load_batch(ds, range(b), s)
    print(f"machine: {machine()}; backend {jax.default_backend()}, {jax.device_count()} device(s)")
    sides = {f"{st}, {dt}": ZooForward(models, strategy=st, dtype=dt, engine="jax")
             for dt in ("float32", "bfloat16") for st in ("loop", "vmap")}
    for fwd in sides.values():
        fwd(images)  # compile
    times: dict[str, list[float]] = {k: [] for k in sides}
    loads = []
    for _ in range(args.repeats):
        for k, fwd in sides.items():
            loads.append(load_now())
            times[k].append(timed(lambda fwd=fwd: fwd(images))[0])
    print(f"{args.models} x {args.arch} to layer3[1], batch {b}, {s}x{s}")
    _report(times, args.models * b, loads, "loop, float32")

    # What bfloat16 does to the numbers: features and the float64 score of every model.
    kw = dict(batch_size=32, image_size=s, engine="jax")
    f32 = extract_features(models[: args.score_models], ds, **kw)
    bf16 = extract_features(models[: args.score_models], ds, dtype="bfloat16", **kw)
    err = max(_rel(c[k], a[k]) for a, c in zip(f32, bf16, strict=True) for k in a)
    sc32 = {m.name: m for m in score_models({f"m{i}": f for i, f in enumerate(f32)}, ds.labels)}
    sc16 = {m.name: m for m in score_models({f"m{i}": f for i, f in enumerate(bf16)}, ds.labels)}
    print(f"\nbfloat16 vs float32 forward on {len(ds)} images, {len(ds.classes)} classes: "
          f"max feature error {err:.1e} (relative to the largest feature)")
    for name in sorted(sc32):
        a, c = sc32[name].score, sc16[name].score
        print(f"  {name}: score float32 {a:.6f}  bfloat16 {c:.6f}  diff {c - a:+.2e} "
              f"({(c - a) / a:+.2e} relative)")
    rank32 = sorted(sc32, key=lambda k: -sc32[k].score)
    rank16 = sorted(sc16, key=lambda k: -sc16[k].score)
    print(f"  ranking float32 {rank32}, bfloat16 {rank16}: "
          f"{'same' if rank32 == rank16 else 'DIFFERENT'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("engines", "xla-flags", "strategies", "child"),
                   nargs="?", default="engines")
    p.add_argument("--xla", action="append", default=None, metavar="FLAGS",
                   help="xla-flags: one XLA_FLAGS string per side, written --xla=STRING (the '=' "
                        "lets STRING start with --; --xla= is the default flags)")
    p.add_argument("--arch", default="resnet18", help="torchvision ResNet (resnet18, resnet50, ..)")
    p.add_argument("--models", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", default="jax", help=argparse.SUPPRESS)
    p.add_argument("--child-runs", type=int, default=2,
                   help="xla-flags: timed forwards per child process")
    p.add_argument("--score-images", type=int, default=384,
                   help="strategies: images for the bfloat16 score comparison (80%% of them are "
                        "scored; keep that above the feature dimension, or every score "
                        "saturates)")
    p.add_argument("--score-models", type=int, default=2)
    args = p.parse_args()
    {"engines": engines, "xla-flags": xla_flags, "strategies": strategies,
     "child": _child}[args.mode](args)


if __name__ == "__main__":
    main()
