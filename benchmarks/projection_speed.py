"""Projected featurization at scale (issue 15): exact trNTK vs proj-trNTK per projection kind, one process.

For each model -- the method's MLP 784-100-100-100-10 (``mlp``, 99,710 parameters) and a small CNN (``cnn``,
conv5(1->16)-pool-conv5(16->32)-pool-fc(512->160)-fc(160->10), 96,938 parameters) -- at ``--threads`` torch
threads (default 1), fp32, C = 10 output probes (trNTK: one per class):

- ``fwd+bwd``: examples/s of one forward and one backward (sum of the logits) of a batch of ``--batch``
  examples: what a featurization could at best reach per output probe;
- ``exact``: ``tl.kernel(model, x, kind="trntk")`` at N (and at ``--n-large`` for the models in
  ``--exact-large``; otherwise extrapolated as N^2 from N, marked ``~``);
- per projection kind (a fresh ``tl.Projection(K, kind, seed=0)`` per run, so generating the matrix is
  included): the features of ``kind="trntk"`` with ``projection=...`` (``tl.Featurizer(...).features(x)``,
  which writes each block in place into the result; ``tl.features`` gives the same rows) -- examples/s; the
  time for N (measured
  on all N, or on as many examples as ``--max-seconds`` allows and extrapolated linearly, marked ``~``); the
  rate per output probe as a share of ``fwd+bwd``; the time over the exact kernel's; the mean |r| of the
  projected cosine against the exact cosine over the off-diagonal of the first ``--n-fid`` examples; and the
  time of the N x N Gram ``F F^T`` of the features (the rest of a projected kernel; N^2-extrapolated when
  not all N were featurized);
- at ``--n-large`` (default 20,000): ``--large-kinds`` (default: the kind ``tl.Projection(K)`` picks)
  featurized on all of them.

Also printed: which kind ``tl.Projection(K)`` uses by default (marked ``(default)`` in the tables), the GEMM
rate at the start and the end, and the load average. The machine is shared: every timed item (fwd+bwd, the
exact kernel, each kind) runs ``--rounds`` times, the items alternating within a round, and its best run is
kept (load only ever slows a run down); the CPU seconds of that run are printed next to its wall seconds
(CPU well below wall: the process waited for a core). Compare ratios within one run.

Usage::

    .venv/bin/python benchmarks/projection_speed.py --threads 1 --k 2048 --markdown /tmp/speed.md
    .venv/bin/python benchmarks/projection_speed.py --models mlp --k 10240 --kinds rademacher,sjlt,khatri_rao
    # smoke (a few seconds)
    .venv/bin/python benchmarks/projection_speed.py --n 256 --n-large 512 --k 256 --n-fid 128 --max-seconds 5

Inputs are passed as their own tensors (``x[:n].clone()``): the capture plan sizes blocks from the storage
of the tensors the forward saves, which for a view of a larger tensor is the whole of it.

Data: scikit-learn's bundled digits upsampled to 28 x 28 (repeated with small noise beyond 1,797; no
download); models seeded and trained for ``--train-steps`` SGD steps.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from projection import MODELS, digits_28, train  # the models, data and training of benchmarks/projection.py
from torch import Tensor, nn

import tangentlens as tl

KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "kronecker": {"fold": True},  # kron_dim = 16 K per layer, folded into K (see --kron-factor)
}




def gemm_gflops() -> float:
    a, b = torch.randn(1024, 4096), torch.randn(4096, 2048)
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 1024 * 4096 * 2048 / best / 1e9


def fwd_bwd_rate(model: nn.Module, x: Tensor, batch: int, reps: int = 20) -> float:
    """Examples/s of one forward + one backward (sum of logits) of a batch (best of ``reps``)."""
    xb = x[:batch]
    params = [p for p in model.parameters() if p.requires_grad]
    best = float("inf")
    for _ in range(reps + 2):
        t = time.perf_counter()
        torch.autograd.grad(model(xb).sum(), params)
        best = min(best, time.perf_counter() - t)
    return xb.shape[0] / best


def mean_abs_residual(F: Tensor, exact: Tensor) -> float:
    """Mean |projected cosine - exact cosine| over the off-diagonal."""
    F = F.double()
    F = F / F.norm(dim=1, keepdim=True)
    r = (F @ F.T - exact.double()).abs()
    n = r.shape[0]
    r.fill_diagonal_(0)
    return float(r.sum()) / (n * (n - 1))


def timed(fn: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def timed_cpu(fn: Any) -> tuple[Any, float, float]:
    """``(result, wall seconds, CPU seconds of this process)``: CPU well below wall means the process waited
    for a core (the machine is shared)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def featurize(model: nn.Module, x: Tensor, pr: tl.Projection, batch: int) -> Tensor:
    """proj-trNTK features, unnormalized: ``tl.Featurizer(...).features(x)``, the library's path that writes
    each block in place into the result (``tl.features`` gives the same rows)."""
    cfg = tl.KernelConfig(kind="trntk", projection=pr, normalize=False, batch_size=batch)
    with tl.Featurizer(model, cfg) as f:
        return f.features(x)


def gram_seconds(F: Tensor) -> float:
    """Seconds of the symmetric Gram F F^T with cosine normalization (what kernel() adds to features)."""

    def go() -> Tensor:
        K = F @ F.T
        d = K.diagonal().clamp_min(1e-30).rsqrt()
        return K * d[:, None] * d[None, :]

    return timed(go)[1]


def projection(kind: str, k: int, args: argparse.Namespace) -> tl.Projection:
    opts = dict(KIND_OPTIONS.get(kind, {}))
    if kind == "kronecker":
        opts["kron_dim"] = args.kron_factor * k
    return tl.Projection(k, kind, seed=0, **opts)


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The figures of one model; every timed item is run ``--rounds`` times, the items alternating within a
    round, and its best (least wall) run kept: others' load slows a run, it never speeds one up."""
    torch.manual_seed(args.seed)
    model = MODELS[name]()
    x, y = digits_28(max(args.n, args.n_large), args.seed)
    train(model, x[: args.n], y[: args.n], args.train_steps, args.seed)
    P = sum(p.numel() for p in model.parameters())
    N, M, K = args.n, 10, args.k
    res: dict[str, Any] = {
        "model": name,
        "P": P,
        "N": N,
        "N_large": args.n_large,
        "K": K,
        "M": M,
        "rounds": args.rounds,
        "load_start": os.getloadavg(),
    }
    print(f"\n== {name}: P = {P:,}, N = {N:,}, K = {K:,}, M = {M} probes (trNTK), {args.rounds} round(s)",
          flush=True)
    # how many examples each kind featurizes: all N unless a short run says it would take over --max-seconds
    n_run: dict[str, int] = {}
    for kind in args.kinds:
        xp = x[: args.n_probe].clone()
        pr = projection(kind, K, args)
        _, t_probe = timed(lambda xp=xp, pr=pr: featurize(model, xp, pr, args.batch))
        est = t_probe / args.n_probe * N
        fit = max(args.n_fid, min(N, int(args.max_seconds / est * N)))
        n_run[kind] = N if est <= args.max_seconds else fit
    best: dict[str, tuple[float, float]] = {}  # item -> (wall, cpu) of its best run

    def keep(item: str, wall: float, cpu: float) -> None:
        if item not in best or wall < best[item][0]:
            best[item] = (wall, cpu)

    fid: Tensor | None = None
    feats: dict[str, Tensor] = {}
    for rnd in range(args.rounds):
        t0 = time.perf_counter()
        fb = fwd_bwd_rate(model, x, args.batch, reps=5)
        keep("fwd_bwd", args.batch / fb, args.batch / fb)
        exact, t, c = timed_cpu(lambda: tl.kernel(model, x[:N].clone(), kind="trntk", batch_size=args.batch))
        keep("exact", t, c)
        if fid is None:
            fid = exact[: args.n_fid, : args.n_fid].clone()
        del exact
        for kind in args.kinds:
            pr = projection(kind, K, args)  # fresh: generating the matrix is included
            F, t, c = timed_cpu(
                lambda pr=pr, n=n_run[kind]: featurize(model, x[:n].clone(), pr, args.batch)
            )
            keep(kind, t, c)
            if kind not in feats:
                feats[kind] = F[: args.n_fid].clone()
            if rnd == 0:
                best["gram:" + kind] = (gram_seconds(F) * (N / n_run[kind]) ** 2, 0.0)
            del F
        took = time.perf_counter() - t0
        print(f"  round {rnd + 1}: {took:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True)
    assert fid is not None
    res["fwd_bwd"] = args.batch / best["fwd_bwd"][0]
    res["exact_s"], res["exact_cpu_s"] = best["exact"]
    default = tl.Projection(K).kind
    print(f"batched forward+backward {res['fwd_bwd']:,.0f} ex/s (one probe: the ceiling per output probe); "
          f"exact trNTK N={N:,}: {res['exact_s']:.2f} s (cpu {res['exact_cpu_s']:.2f} s)", flush=True)
    print(f"  {'kind':>19} {'ex/s':>8} {'N (s)':>8} {'cpu (s)':>8} {'x exact':>8} {'probe %':>8} "
          f"{'gram (s)':>9} {'mean|r|':>8}")
    rows = []
    for kind in args.kinds:
        nr = n_run[kind]
        t, c = best[kind]
        rate = nr / t
        row = {
            "kind": kind,
            "options": {
                k: v
                for k, v in projection(kind, K, args).to_dict().items()
                if k in ("s", "kron_dim", "fold", "fallback", "tile")
            },
            "n_run": nr,
            "seconds_N": N / rate,
            "cpu_seconds_N": c * N / nr,
            "extrapolated": nr < N,
            "rate": rate,
            "per_probe_share": rate * M / res["fwd_bwd"],
            "vs_exact": (N / rate) / res["exact_s"],
            "gram_s": best["gram:" + kind][0],
            "mean_abs_r": mean_abs_residual(feats[kind], fid),
            "default": kind == default,
        }
        rows.append(row)
        mark = "~" if nr < N else " "
        label = kind + (" (default)" if row["default"] else "")
        print(
            f"  {label:>19} {rate:8.1f} {mark}{N / rate:7.2f} {mark}{row['cpu_seconds_N']:7.2f} "
            f"{row['vs_exact']:8.2f} {100 * row['per_probe_share']:7.1f}% {mark}{row['gram_s']:8.2f} "
            f"{row['mean_abs_r']:8.4f}",
            flush=True,
        )
    res["kinds"] = rows
    # the large N: the recommended kind(s) on all of them, the exact kernel measured or extrapolated
    large: dict[str, Any] = {}
    if args.n_large > N:
        NL = args.n_large
        if name in args.exact_large:
            xl = x[:NL].clone()
            kl, tl_exact = timed(lambda: tl.kernel(model, xl, kind="trntk", batch_size=args.batch))
            del kl
            large["exact_s"], large["exact_extrapolated"] = tl_exact, False
        else:
            large["exact_s"], large["exact_extrapolated"] = res["exact_s"] * (NL / N) ** 2, True
        print(
            f"exact trNTK N={NL:,}: {'~' if large['exact_extrapolated'] else ''}{large['exact_s']:.1f} s",
            flush=True,
        )
        large["kinds"] = []
        for kind in args.large_kinds:
            pr = projection(kind, K, args)
            F, t = timed(
                lambda pr=pr: featurize(model, x[:NL].clone(), pr, args.batch)
            )
            g = next((r["gram_s"] for r in rows if r["kind"] == kind), float("nan")) * (NL / N) ** 2
            entry = {
                "kind": kind,
                "seconds": t,
                "rate": NL / t,
                "per_probe_share": NL / t * M / res["fwd_bwd"],
                "vs_exact": t / large["exact_s"],
                "gram_s_extrapolated": g,
                "features_GB": F.numel() * F.element_size() / 1e9,
            }
            large["kinds"].append(entry)
            del F
            print(
                f"  {kind:>11} N={NL:,}: {t:.1f} s ({NL / t:,.0f} ex/s, {entry['vs_exact']:.3f} x exact), "
                f"features {entry['features_GB']:.2f} GB, gram ~{g:.0f} s",
                flush=True,
            )
    res["large"] = large
    res["load_end"] = os.getloadavg()
    return res


def targets(res: dict[str, Any]) -> list[str]:
    """The issue's two targets, per model, stated honestly."""
    out = []
    rows = res["kinds"]
    best = max(rows, key=lambda r: r["rate"])
    dflt = next((r for r in rows if r["default"]), None)
    N = res["N"]
    for label, r in (("fastest", best), ("default", dflt)):
        if r is None:
            continue
        ok = r["vs_exact"] <= 1.0
        out.append(
            f"{label} kind {r['kind']!r}, N = {N:,}: featurization {r['seconds_N']:.2f} s vs exact "
            f"{res['exact_s']:.2f} s -> {'MET' if ok else 'MISSED'} ({r['vs_exact']:.2f} x exact; with the "
            f"Gram, a projected kernel takes {(r['seconds_N'] + r['gram_s']) / res['exact_s']:.1f} x exact)"
        )
        share = r["per_probe_share"]
        out.append(
            f"{label} kind {r['kind']!r}: {r['rate'] * res['M']:,.0f} example-probes/s = "
            f"{100 * share:.1f}% of fwd+bwd ({res['fwd_bwd']:,.0f}/s) -> "
            f"{'MET' if share >= 0.3 else 'MISSED'}"
        )
    for e in res["large"].get("kinds", []):
        NL = res["N_large"]
        ok = e["vs_exact"] <= 1.0
        out.append(
            f"{e['kind']!r}, N = {NL:,}: featurization {e['seconds']:.1f} s vs exact "
            f"{'~' if res['large']['exact_extrapolated'] else ''}{res['large']['exact_s']:.1f} s -> "
            f"{'MET' if ok else 'MISSED'} ({e['vs_exact']:.3f} x exact; per probe "
            f"{100 * e['per_probe_share']:.1f}% of fwd+bwd; the N x N Gram of its features "
            f"~{e['gram_s_extrapolated']:.0f} s)"
        )
    return out


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"GEMM {meta['gemm_start']:.1f} GFLOP/s at the start, {meta['gemm_end']:.1f} at the end; "
        f"`tl.Projection(K)` default kind: `{meta['default_kind']}`; torch {torch.__version__}, "
        f"{meta['threads']} thread(s).",
        "",
    ]
    for res in results:
        lines += [
            f"### {res['model']}: P = {res['P']:,}, N = {res['N']:,}, K = {res['K']:,}, M = {res['M']}",
            "",
            f"batched forward+backward {res['fwd_bwd']:,.0f} ex/s; exact trNTK at N: {res['exact_s']:.2f} s "
            f"(CPU {res['exact_cpu_s']:.2f} s); best of {res['rounds']} alternating round(s); "
            f"load {res['load_start'][0]:.2f} -> {res['load_end'][0]:.2f}",
            "",
            "| kind | options | ex/s | time for N (s) | CPU for N (s) | x exact | per probe, % of fwd+bwd "
            "| Gram at N (s) | mean abs r |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["kinds"]:
            mark = "~" if r["extrapolated"] else ""
            opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
            lines.append(
                f"| {r['kind']}{' (default)' if r['default'] else ''} | {opts} | {r['rate']:,.1f} | "
                f"{mark}{r['seconds_N']:.2f} | {mark}{r['cpu_seconds_N']:.2f} | {r['vs_exact']:.2f} | "
                f"{100 * r['per_probe_share']:.1f} | "
                f"{mark}{r['gram_s']:.2f} | {r['mean_abs_r']:.4f} |"
            )
        lg = res["large"]
        if lg:
            lines += [
                "",
                f"N = {res['N_large']:,}: exact trNTK {'~' if lg['exact_extrapolated'] else ''}"
                f"{lg['exact_s']:.1f} s" + (" (N^2 from N)" if lg["exact_extrapolated"] else ""),
            ]
            for e in lg["kinds"]:
                lines.append(
                    f"- `{e['kind']}`: {e['seconds']:.1f} s ({e['rate']:,.0f} ex/s, {e['vs_exact']:.3f} x "
                    f"exact, per probe {100 * e['per_probe_share']:.1f}% of fwd+bwd), features "
                    f"{e['features_GB']:.2f} GB, their N x N Gram ~{e['gram_s_extrapolated']:.0f} s"
                )
        lines += ["", "Targets:", ""] + [f"- {t}" for t in targets(res)] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-large", type=int, default=20000)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--kinds", default="rademacher,gaussian,sjlt,srht,kronecker,khatri_rao")
    ap.add_argument("--large-kinds", default="default", help="kinds at --n-large ('default': Projection(K))")
    ap.add_argument("--exact-large", default="mlp", help="models whose exact kernel is measured at --n-large")
    ap.add_argument("--kron-factor", type=int, default=16, help="kronecker: kron_dim = factor x K, folded")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-fid", type=int, default=500)
    ap.add_argument("--n-probe", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=3, help="runs of every item, alternating; the best is kept")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    default = tl.Projection(args.k).kind
    args.large_kinds = [default if k == "default" else k for k in args.large_kinds.split(",") if k]
    args.exact_large = [k for k in args.exact_large.split(",") if k]
    torch.set_num_threads(args.threads)
    args.n_fid = min(args.n_fid, args.n)
    meta: dict[str, Any] = {
        "threads": args.threads,
        "default_kind": tl.Projection(args.k).kind,
        "gemm_start": gemm_gflops(),
        "argv": vars(args),
    }
    print(
        f"GEMM {meta['gemm_start']:.1f} GFLOP/s; load {os.getloadavg()}; tl.Projection(K) default kind: "
        f"{meta['default_kind']!r}",
        flush=True,
    )
    results = [run_model(m, args) for m in args.models.split(",") if m]
    meta["gemm_end"] = gemm_gflops()
    print(f"\nGEMM at the end {meta['gemm_end']:.1f} GFLOP/s; load {os.getloadavg()}")
    for res in results:
        print(f"\nTargets, {res['model']}:")
        for t in targets(res):
            print("  " + t)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
