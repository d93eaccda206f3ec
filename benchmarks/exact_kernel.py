"""Exact trNTK: tangentlens' hook-based engine vs torch.func vmap(jacrev) + Gram (the PyTorch tutorial way).

Runs both in one process on the method's MNIST MLP (784-100-100-100-10) and a small CNN (MNIST-sized
inputs), checks they give the same kernel, prints times and ratios, and measures the peak resident memory
of the MLP's exact trNTK at a larger N in a fresh subprocess. ``--pair`` also times the two blocks a
surrogate needs, K(train, train) and K(test, train), as two ``kernel`` calls vs one ``train_test_kernels``.

    python benchmarks/exact_kernel.py                # N = 2,000 and the N = 10,000 memory check
    python benchmarks/exact_kernel.py --n 500 --mem-n 2000   # quick
    OMP_NUM_THREADS=1 python benchmarks/exact_kernel.py --small   # the small call, N = 64, one thread
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import tangentlens as tl


def mnist_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
        nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10),
    )


def small_cnn() -> nn.Module:
    """LeNet-style CNN (80k parameters): two 5x5 convolutions with pooling, two dense layers."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def conv_heavy_cnn() -> nn.Module:
    """All-convolutional CNN (13k parameters, 97% in convolutions): the hard case for exact kernels,
    whose Gram cost N²·C·P is the same for every method that forms per-example gradients."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 5 * 5, 10),
    )


def data(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g)


def baseline_trntk(model: nn.Module, x: torch.Tensor, chunk: int = 250) -> torch.Tensor:
    """The tutorial method: per-example Jacobians with vmap(jacrev), flattened, then a Gram product."""
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    jac_fn = vmap(jacrev(f), (None, 0))
    rows = []
    for s in range(0, len(x), chunk):
        J = jac_fn(params, x[s : s + chunk])
        rows.append(torch.cat([j.reshape(j.shape[0], -1) for j in J.values()], 1))  # (B, C*P)
    G = torch.cat(rows)
    K = G @ G.T
    d = K.diagonal().sqrt()
    return K / d[:, None] / d[None, :]


def bench(name: str, model: nn.Module, n: int) -> dict:
    x = data(n)
    tl.kernel(model, x[:64], kind="trntk")  # warm-up
    t = time.perf_counter()
    ours = tl.kernel(model, x, kind="trntk", batch_size=500)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = baseline_trntk(model, x)
    t_ref = time.perf_counter() - t
    err = float((ours - ref).abs().max())
    P = sum(p.numel() for p in model.parameters())
    row = dict(model=name, params=P, n=n, ours_s=t_ours, baseline_s=t_ref, speedup=t_ref / t_ours,
               max_abs_diff=err)
    print(f"{name:6s} P={P:6d} N={n}: tangentlens {t_ours:7.3f} s | vmap(jacrev)+Gram {t_ref:7.2f} s | "
          f"speed-up {t_ref / t_ours:6.1f}x | max |diff| {err:.1e}", flush=True)
    return row


def bench_pair(name: str, model: nn.Module, n: int, t: int) -> dict:
    x = data(n + t)
    xtr, xte = x[:n], x[n:]
    tl.kernel(model, x[:64], kind="trntk")  # warm-up
    t0 = time.perf_counter()
    a_tr = tl.kernel(model, xtr, kind="trntk", batch_size=500)
    a_te = tl.kernel(model, xte, xtr, kind="trntk", batch_size=500)
    t_two = time.perf_counter() - t0
    t0 = time.perf_counter()
    b_tr, b_te = tl.train_test_kernels(model, xtr, xte, kind="trntk", batch_size=500)
    t_one = time.perf_counter() - t0
    err = max(float((a_tr - b_tr).abs().max()), float((a_te - b_te).abs().max()))
    print(f"{name:6s} train {n} / test {t}: two kernel calls {t_two:7.2f} s | train_test_kernels "
          f"{t_one:7.2f} s | speed-up {t_two / t_one:5.2f}x | max |diff| {err:.1e}", flush=True)
    return dict(model=name, n_train=n, n_test=t, two_calls_s=t_two, pair_s=t_one, max_abs_diff=err)


def repeat_times(f: Callable[[], object], reps: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``reps`` timed calls of ``f`` after ``warmup`` untimed ones, sorted (best first)."""
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)


def bench_same(name: str, model: nn.Module, n: int, reps: int = 3) -> dict:
    """kernel(model, x) vs kernel(model, x, x) (same object: the symmetric path) vs kernel(model, x, x')
    with x' an equal copy (the cross path): best of ``reps`` after a warm-up."""
    x = data(n)
    calls = {
        "kernel(m, x)": lambda: tl.kernel(model, x, kind="trntk"),
        "kernel(m, x, x)": lambda: tl.kernel(model, x, x, kind="trntk"),
        "kernel(m, x, x.clone())": lambda: tl.kernel(model, x, x.clone(), kind="trntk"),
    }
    out = {label: repeat_times(f, reps, warmup=1)[0] for label, f in calls.items()}
    base = out["kernel(m, x)"]
    print(f"{name} N={n}: " + ", ".join(f"{k} {v:.3f} s ({v / base:.2f}x)" for k, v in out.items()))
    return out


def bench_small(n: int = 64, reps: int = 100) -> dict:
    """The small call: the MLP's exact trNTK at N = ``n`` on one thread. The first call on a model object
    runs the first-block checks (an extra backward); later calls on it replay their outcome. Prints the
    first call (median over fresh model objects), then the best and median of ``reps`` repeated calls of
    ``kernel(m, x)`` and of ``kernel(m, x, x)`` (the symmetric case)."""
    x = data(n)
    model = mnist_mlp()
    firsts = []
    for _ in range(15):
        fresh = mnist_mlp()
        t = time.perf_counter()
        tl.kernel(fresh, x, kind="trntk")
        firsts.append(time.perf_counter() - t)
    out = {"first call (fresh model), median": sorted(firsts)[len(firsts) // 2]}
    for label, f in (("kernel(m, x)", lambda: tl.kernel(model, x, kind="trntk")),
                     ("kernel(m, x, x)", lambda: tl.kernel(model, x, x, kind="trntk"))):
        ts = repeat_times(f, reps, warmup=5)
        out[f"{label}, best"] = ts[0]
        out[f"{label}, median"] = ts[len(ts) // 2]
    print(f"MLP exact trNTK N={n}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in out.items()))
    return out


def _hwm() -> int:
    """Peak resident set size of this process in bytes (VmHWM; not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mem_child(n: int) -> None:
    model = mnist_mlp()
    x = data(n)
    tl.kernel(model, x[:256], kind="trntk")
    base = _hwm()
    t = time.perf_counter()
    K = tl.kernel(model, x, kind="trntk", batch_size=500)
    dt = time.perf_counter() - t
    peak = _hwm()
    print(json.dumps(dict(n=n, base=base, peak=peak, result=K.numel() * K.element_size(), seconds=dt)))


def memory(n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--mem-child", str(n)], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    extra = (r["peak"] - r["base"] - r["result"]) / 2**30
    print(f"MLP exact trNTK N={n}: {r['seconds']:.2f} s, peak RSS {r['peak'] / 2**30:.2f} GiB, "
          f"result {r['result'] / 2**30:.2f} GiB, beyond result and start-up: {extra:.2f} GiB", flush=True)
    r["extra_gib"] = extra
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--mem-n", type=int, default=10000)
    ap.add_argument("--mem-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--pair", type=int, nargs=2, metavar=("N_TRAIN", "N_TEST"), default=None,
                    help="only time train_test_kernels against two kernel calls")
    ap.add_argument("--same", action="store_true",
                    help="only time kernel(m, x, x) against kernel(m, x) (is the symmetric case recognised?)")
    ap.add_argument("--small", action="store_true",
                    help="only time the small call: the MLP's exact trNTK at N = 64 (set --n to change)")
    a = ap.parse_args()
    if a.mem_child:
        _mem_child(a.mem_child)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    if a.pair:
        for name, model in (("MLP", mnist_mlp()), ("CNN", small_cnn()), ("CNN-c", conv_heavy_cnn())):
            bench_pair(name, model, *a.pair)
        return
    if a.small:
        bench_small(a.n if a.n != ap.get_default("n") else 64)
        return
    if a.same:
        bench_same("MLP", mnist_mlp(), a.n)
        bench_same("CNN", small_cnn(), min(a.n, 500))
        return
    if a.mem_n:
        memory(a.mem_n)
    bench("MLP", mnist_mlp(), a.n)
    bench("CNN", small_cnn(), a.n)
    bench("CNN-c", conv_heavy_cnn(), a.n)


if __name__ == "__main__":
    main()
