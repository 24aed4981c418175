"""Fine-tuning step time: ddscore-jax's trainer against PyTorch on the same network.

ResNet18 (torchvision layout, BatchNorm in training mode), batch 32 at 64 px, 3 classes, plain
SGD: ``ddscore_jax.train.Trainer`` (one compiled step with the optimiser update, one step in
flight, the loss of the step before read back) and ``torch.optim.SGD`` in eager mode with
``torch.get_num_threads()`` threads. Two comparisons, each in alternating rounds (interleaved),
after a warm-up that compiles; the load average is printed with every figure:

- ``run``: a whole ``Trainer.train`` of ``--steps`` steps (batch gathering, host-to-device
  copies, the per-step loss read) against torch's loop over the same batches;
- ``step``: the compiled step alone on one device-resident batch against torch's step alone
  (forward, backward, update, ``loss.item()``) on one batch: the arithmetic, nothing else.

    python benchmarks/bench_finetune.py                      # 3 rounds of 8 steps
    python benchmarks/bench_finetune.py --rounds 2 --steps 4 --lax-conv

Also printed: the compile time of the first call (XLA compilations counted through
``jax.monitoring``) and that a second model of the same config compiles nothing.
``--lax-conv`` sends every convolution through ``lax.conv_general_dilated`` as before
``model.conv_op`` existed, to measure what computing small-map convolutions as matrix products
gives (XLA:CPU runs layer4's operand-swapped 3x3 convolutions on 2x2 maps in a naive loop).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_now, machine, median  # noqa: E402

BATCH, SIZE, CLASSES = 32, 64, 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lax-conv", action="store_true",
                        help="every convolution through lax.conv_general_dilated (the code "
                             "before model.conv_op), for the before/after figure")
    args = parser.parse_args(argv)

    import dataclasses

    import jax
    import jax.numpy as jnp
    import torch
    import torchvision
    from flax import nnx

    from ddscore_jax import model, train

    if args.lax_conv:
        # Before any graph is built: _conv reads conv_op when it constructs each layer.
        def lax_conv(lhs, rhs, *a, dimension_numbers=None, **kw):
            return jax.lax.conv_general_dilated(
                lhs, rhs, *a, dimension_numbers=dimension_numbers or ("NHWC", "HWIO", "NHWC"),
                **kw)
        model.conv_op = lax_conv

    compiles: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **_: compiles.append(secs)
        if event == "/jax/core/compile/backend_compile_duration" else None)

    rng = np.random.default_rng(0)
    n = BATCH * args.steps
    x = rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)
    y = rng.integers(0, CLASSES, n)
    config = dataclasses.replace(model.CONFIGS["resnet18"], num_classes=CLASSES)
    recipe = train.Recipe(batch_size=BATCH, optimizer="sgd", learning_rate=0.01, momentum=0.0,
                          weight_decay=0.0, schedule="constant")
    sd = model.init_state_dict(config, 0)
    trainer = train.Trainer(config, recipe)

    def ours(steps: int, seed: int = 0) -> float:
        state = model.from_state_dict(model.init_state_dict(config, seed), config)
        t = time.perf_counter()
        train.Trainer(config, recipe).train(state, x, y, steps, seed=0)  # ends on the host
        return time.perf_counter() - t

    params, stats = nnx.split_state(model.from_state_dict(sd, config), nnx.Param, nnx.BatchStat)
    opt_state = trainer.tx.init(params)
    xb, yb = jnp.asarray(x[:BATCH]), jnp.asarray(y[:BATCH], jnp.int32)
    rate, key = jnp.float32(0.01), jax.random.key(0)

    def our_step() -> float:
        nonlocal params, stats, opt_state
        t = time.perf_counter()
        params, stats, opt_state, loss = trainer._step(params, stats, opt_state, xb, yb, rate,
                                                       key)
        loss.block_until_ready()
        return time.perf_counter() - t

    net = torchvision.models.resnet18(num_classes=CLASSES)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()

    def torch_step(idx) -> float:
        t = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
        loss.item()
        return time.perf_counter() - t

    def theirs(steps: int) -> float:
        order = np.random.default_rng(0).permutation(n)
        return sum(torch_step(torch.from_numpy(order[i * BATCH:(i + 1) * BATCH]))
                   for i in range(steps))

    print(f"# {machine()}")
    print(f"# ResNet18, batch {BATCH}, {SIZE} px, train-mode BatchNorm, plain SGD; jax "
          f"{jax.__version__}, torch {torch.__version__} with {torch.get_num_threads()} threads"
          f"{'; --lax-conv (before model.conv_op)' if args.lax_conv else ''}")
    load = load_now()
    before = len(compiles)  # the set-up's own small compilations are not the step's
    first = ours(1)
    step_compiles = compiles[before:]
    # None at all when the persistent compilation cache already holds the step.
    print(f"first call (compile + 1 step): {first:.2f} s, {len(step_compiles)} XLA compilations "
          f"({sum(step_compiles):.2f} s, the largest {max(step_compiles, default=0.0):.2f} s), "
          f"load {load:.2f}")
    done = len(compiles)
    again = ours(1, seed=1)
    print(f"a second model, same config: 1 step {again:.2f} s, "
          f"{len(compiles) - done} compilations, load {load_now():.2f}")
    our_step()  # compiled above; first call on these buffers
    theirs(1)  # torch warm-up (allocator, kernels)
    run_ours, run_torch, step_ours, step_torch = [], [], [], []
    whole = torch.arange(BATCH)
    for r in range(args.rounds):
        run_ours.append(ours(args.steps) / args.steps)
        run_torch.append(theirs(args.steps) / args.steps)
        step_ours.append(median([our_step() for _ in range(args.steps)]))
        step_torch.append(median([torch_step(whole) for _ in range(args.steps)]))
        print(f"round {r + 1}: run ddscore-jax {run_ours[-1]:.3f} s/step, torch "
              f"{run_torch[-1]:.3f}; step alone ddscore-jax {step_ours[-1]:.3f} s, torch "
              f"{step_torch[-1]:.3f} s; load {load_now():.2f}", flush=True)
    print(f"median per step, run: ddscore-jax {median(run_ours):.3f} s, torch "
          f"{median(run_torch):.3f} s, ratio {median(run_ours) / median(run_torch):.2f}; "
          f"step alone: ddscore-jax {median(step_ours):.3f} s, torch {median(step_torch):.3f} s, "
          f"ratio {median(step_ours) / median(step_torch):.2f}; load {load_now():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
