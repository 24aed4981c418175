"""Fine-tuning step time: ddscore-jax's trainer against PyTorch on the same network.

ResNet18 (torchvision layout, BatchNorm in training mode), batch 32 at 64 px, 3 classes, plain
SGD: ``ddscore_jax.train.Trainer`` (one compiled step, one step in flight, the loss of the step
before read back) and ``torch.optim.SGD`` in eager mode with ``torch.get_num_threads()`` threads.
The two are timed in alternating rounds (interleaved), each round a fresh run of ``--steps``
steps after a warm-up round that compiles; the load average is printed with every figure.

    python benchmarks/bench_finetune.py               # 4 rounds of 10 steps
    python benchmarks/bench_finetune.py --rounds 2 --steps 5

Also printed: the compile time of the first step, and that a second model of the same config
(another Trainer, other weights) compiles nothing.
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
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)

    import dataclasses

    import torch
    import torchvision

    from ddscore_jax import model, train

    rng = np.random.default_rng(0)
    n = BATCH * args.steps
    x = rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)
    y = rng.integers(0, CLASSES, n)
    config = dataclasses.replace(model.CONFIGS["resnet18"], num_classes=CLASSES)
    recipe = train.Recipe(batch_size=BATCH, optimizer="sgd", learning_rate=0.01, momentum=0.0,
                          weight_decay=0.0, schedule="constant")
    sd = model.init_state_dict(config, 0)

    def ours(steps: int) -> float:
        trainer = train.Trainer(config, recipe)
        state = model.from_state_dict(sd, config)
        t = time.perf_counter()
        trainer.train(state, x, y, steps, seed=0)  # returns after the last loss is on the host
        return time.perf_counter() - t

    net = torchvision.models.resnet18(num_classes=CLASSES)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y)

    def theirs(steps: int) -> float:
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        order = np.random.default_rng(0).permutation(n)
        t = time.perf_counter()
        for i in range(steps):
            idx = torch.from_numpy(order[i * BATCH:(i + 1) * BATCH])
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            loss.item()
        return time.perf_counter() - t

    print(f"# {machine()}")
    print(f"# ResNet18, batch {BATCH}, {SIZE} px, train-mode BatchNorm, plain SGD; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    first = ours(1)
    print(f"first call (compile + 1 step): {first:.2f} s, load {load_now():.2f}")
    again = ours(1)
    print(f"a second model, same config (no compile): 1 step {again:.2f} s, load {load_now():.2f}")
    theirs(1)  # torch warm-up (allocator, kernels)
    jax_t, torch_t = [], []
    for r in range(args.rounds):
        jax_t.append(ours(args.steps) / args.steps)
        torch_t.append(theirs(args.steps) / args.steps)
        print(f"round {r + 1}: ddscore-jax {jax_t[-1]:.3f} s/step, torch {torch_t[-1]:.3f} "
              f"s/step, load {load_now():.2f}")
    print(f"median per step: ddscore-jax {median(jax_t):.3f} s, torch {median(torch_t):.3f} s, "
          f"ratio {median(jax_t) / median(torch_t):.2f}; load {load_now():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
