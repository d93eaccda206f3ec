"""Training-step benchmark of the experiments' seed-stacked reference CNN (``experiments/models.py``).

One optimizer step of the MNIST2 CNN recipe (batch 4 per model, MSE on sigmoid, forward + backward)
for S models trained together, two formulations side by side in one process:

- ``vmap``: ``torch.vmap(functional_call(ReferenceCNN))`` over the stacked parameters (what
  ``train_group`` used until 2026-11-29),
- ``stacked``: ``models._cnn_stacked`` (grouped convolutions, width scaling on the weights, no
  identity relu after pooling), what ``train_group`` uses now.

Rounds of ``--steps`` steps alternate between the two (so a noisy, shared machine affects both alike);
the median and the minimum of the per-step times over ``--rounds`` rounds are printed, with the
ratio of medians. Both are checked to give the same loss and gradients (to float32 rounding) first.
``--loop N`` also times whole ``train_group`` epochs over N generated examples (data indexing, loss,
optimizer step included) with each formulation in turn.

    python benchmarks/train_cnn_step.py --seeds 1,5,20 --threads 2
    python benchmarks/train_cnn_step.py --seeds 20 --loop 1200 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch.func import functional_call, stack_module_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import models  # noqa: E402
from models import SETTINGS, _cnn_stacked, make_model, train_group  # noqa: E402

Stacked = dict[str, torch.Tensor]
Forward = Callable[[Stacked, Stacked, torch.Tensor], torch.Tensor]


def _vmapped() -> Forward:
    """The former formulation: ``vmap`` of ``ReferenceCNN.forward`` over stacked parameters."""
    base = make_model("cnn", 0).to("meta")
    return torch.vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)))


def _setup(s: int, batch: int) -> tuple[Stacked, Stacked, torch.Tensor, torch.Tensor]:
    models = [make_model("cnn", seed) for seed in range(s)]
    params, buffers = stack_module_state(models)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(s, batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 2, (s, batch), generator=g).float()
    return params, buffers, x, y


def _step(fn: Forward, params: Stacked, buffers: Stacked, x: torch.Tensor, y: torch.Tensor) -> None:
    for v in params.values():
        v.grad = None
    out = fn(params, buffers, x)[..., 0]
    ((torch.sigmoid(out) - y) ** 2).mean(dim=1).sum().backward()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,5,20", help="comma-separated numbers of models trained together")
    ap.add_argument("--batch", type=int, default=4, help="examples per model per step (the recipe's 4)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loop", type=int, default=0, help="also time train_group epochs on N examples")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} per model")
    print("| models | vmap ms/step (median, min) | stacked ms/step (median, min) | speed-up (medians) |")
    print("|---|---|---|---|")
    sizes = [int(v) for v in args.seeds.split(",")]
    kinds: dict[str, Forward] = {"vmap": _vmapped(), "stacked": _cnn_stacked}
    for s in sizes:
        params, buffers, x, y = _setup(s, args.batch)
        grads = {}
        for name, fn in kinds.items():
            _step(fn, params, buffers, x, y)
            grads[name] = [v.grad.clone() for v in params.values()]  # type: ignore[union-attr]
        for a, b in zip(grads["vmap"], grads["stacked"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for name, fn in kinds.items():
                t = time.perf_counter()
                for _ in range(args.steps):
                    _step(fn, params, buffers, x, y)
                times[name].append((time.perf_counter() - t) / args.steps * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = [f"{med[k]:.1f}, {min(times[k]):.1f}" for k in kinds]
        print(f"| {s} | {cells[0]} | {cells[1]} | {med['vmap'] / med['stacked']:.2f}x |", flush=True)
    if args.loop:
        for s in sizes:
            _time_loop(s, args.loop, rounds=2)


def _time_loop(s: int, n: int, rounds: int) -> None:
    """Alternate one ``train_group`` epoch (MNIST2 CNN recipe) per formulation, ``rounds`` times."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 2
    rec = replace(SETTINGS["mnist2-cnn"].recipe, epochs=1)
    kinds: dict[str, Forward] = {"vmap": _vmapped(), "stacked": _cnn_stacked}
    steps = -(-n // rec.batch_size)
    for _ in range(rounds):
        for name, fn in kinds.items():
            models._cnn_stacked = fn  # train_group looks the forward up at call time
            t = time.perf_counter()
            train_group("cnn", list(range(s)), x, y, rec, progress=False)
            print(f"train_group, {s} models, {name}: {(time.perf_counter() - t) / steps * 1e3:.1f} ms/step")
    models._cnn_stacked = _cnn_stacked


if __name__ == "__main__":
    main()
