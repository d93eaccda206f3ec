"""The engine: one prepared model and capturer streaming blocks of examples, and the kernel passes on it.

An :class:`Engine` owns the capture of one call: the output probes of its kind, the gradient (or activation)
capturer, and the plan that sizes blocks from the memory budget. :func:`symmetric_pass` and
:func:`cross_pass` accumulate the unnormalized Gram blocks of K(A, A) (upper triangle, mirrored) and K(A, B)
with their diagonals, keeping captures in memory while they fit the cache half of the budget and
recomputing them per block otherwise. Normalization is left to :mod:`tangentlens.blocks`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .capture import ActivationCapture, BlockCapture, GradientCapture
from .config import KernelConfig
from .errors import MemoryBudgetWarning, NonFiniteError, warn
from .inputs import Batch, Block, Source, batch_size_of, move_batch
from .memory import Budget, format_bytes, resolve_budget
from .network import prepared, requiring_grad, select_parameters
from .probes import make_probe_fn

_WHOLE_TRIAL = 64  # first blocks up to this size are planned from their own capture (no separate trial)

Captures = list[tuple[int, BlockCapture]]


class Engine:
    """One prepared model, one capturer, and the plan that sizes its blocks from the memory budget.

    Args:
        model: the prepared (eval-mode, placed) model.
        config: the call's configuration (kind, probes, parameters, implementation, batch size).
        device, dtype: where and in which dtype blocks are captured.
        predicted: use the network's predicted labels for the label kinds.
        budget: the call's memory budget.
        materialize: what the consumer of the captures needs: "chosen" (kernels: layers materialize where
            the plan finds it cheaper), "all" (flat features), "kronecker" (Kronecker-projected features).
        block_size: examples per capture, overriding the plan's choice (the plan still runs).

    ``n_cache`` (set by the kernel passes before the first block) is how many examples' captures may be
    kept at once; the plan uses it to decide which layers to materialize.
    """

    def __init__(
        self,
        model: nn.Module,
        config: KernelConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        predicted: bool,
        budget: Budget,
        materialize: str = "chosen",
        block_size: int | None = None,
    ) -> None:
        spec = config.spec
        self.device = device
        self.dtype = dtype
        self.budget = budget
        self.limit = config.batch_size
        self.forced_block = block_size
        self.materialize = materialize
        self.n_cache = 0
        self.block: int | None = None  # examples per capture, planned on the first block
        self._pending: tuple[Batch, BlockCapture] | None = None  # the first block, captured by the plan
        self.acts: ActivationCapture | None = None
        self.grads: GradientCapture | None = None
        self.params: dict[str, nn.Parameter] = {}
        if not spec.gradients:
            self.acts = ActivationCapture(model, spec.name, config.modules)
        else:
            self.params = select_parameters(model, config.parameters)
            fn = make_probe_fn(spec, config.probe_matrix, config.probe_seed, predicted)
            self.grads = GradientCapture(model, self.params, fn, keep_factors=materialize == "kronecker",
                                         implementation=config.implementation)

    def capture(self, x: Batch, y: Tensor | None) -> BlockCapture:
        """The compact capture of one block (the planning trial's own capture when it took the block)."""
        if self._pending is not None and self._pending[0] is x:
            cap, self._pending = self._pending[1], None
            return cap
        x = move_batch(x, self.device, self.dtype)
        if self.acts is not None:
            return self.acts.capture(x)
        assert self.grads is not None
        return self.grads.capture(x, y)

    def plan(self, blk: Block) -> int:
        """Plan the block size on ``blk`` (the first block) if not done yet; return it."""
        if self.block is None:
            self._plan(blk)
        assert self.block is not None
        return self.block

    def blocks(self, src: Source, skip_before: int = 0) -> Iterator[Block]:
        """``src``'s blocks, split to the planned size; those ending at or before ``skip_before`` skipped."""
        for blk in src.blocks():
            for sub in blk.split(self.plan(blk)):
                if sub.start + sub.size > skip_before:
                    yield sub

    def captures(self, src: Source, skip_before: int = 0) -> Iterator[tuple[int, BlockCapture]]:
        """``(start, capture)`` of each planned block of ``src``."""
        for blk in self.blocks(src, skip_before):
            yield blk.start, self.capture(blk.x, blk.y)

    def _plan(self, blk: Block) -> None:
        if self.grads is None:
            self.block = self.limit if self.forced_block is None else self.forced_block
            return
        x = move_batch(blk.x, self.device, self.dtype)
        plan = self.grads.plan(
            x, blk.y, limit=self.limit, n_cache=self.n_cache, cache_budget=self.budget.cache,
            work_budget=self.budget.work, materialize=self.materialize, trial=self._trial_size(x),
        )
        self.block = plan.block if self.forced_block is None else self.forced_block
        if plan.capture is not None and self.block >= batch_size_of(x):
            self._pending = (blk.x, plan.capture)
        if plan.fits < min(self.limit, blk.size) or plan.dropped:
            what = []
            if plan.fits < min(self.limit, blk.size):
                what.append(
                    f"captures {plan.fits} examples at a time instead of batch_size={self.limit} "
                    f"(≈ {format_bytes(plan.working)} of working memory per example)"
                )
            if plan.dropped:
                what.append(f"keeps the factored form of {len(plan.dropped)} layers so that the captures "
                            "of all examples fit the cache")
            warn(
                f"To stay within its memory budget of {format_bytes(self.budget.total)} the call "
                f"{' and '.join(what)}. Pass memory_budget= (bytes) to change the budget.",
                MemoryBudgetWarning,
            )

    def _trial_size(self, x: Batch) -> int:
        """Examples of the first block the planning capture takes: the whole block for a small call on a
        small model (≤ 64 examples, ≤ 64 MiB of selected parameters, inputs far below the working budget),
        whose capture then serves as the block's own; else 4."""
        B = batch_size_of(x)
        pbytes = sum(p.numel() * p.element_size() for p in self.params.values())
        tensors = list(x.values()) if isinstance(x, dict) else [x]
        xbytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))
        if B <= _WHOLE_TRIAL and pbytes <= 64 * 2**20 and 32 * xbytes <= self.budget.work:
            return B
        return 4

    def close(self) -> None:
        """Remove the capturer's hooks."""
        if self.acts is not None:
            self.acts.close()
        if self.grads is not None:
            self.grads.__exit__()


@contextmanager
def open_engine(model: nn.Module, config: KernelConfig, predicted: bool) -> Iterator[Engine]:
    """An engine on the prepared (eval-mode, placed) model; everything is restored on exit."""
    with prepared(model, device=config.device, dtype=config.torch_dtype) as (work, dev, dt):
        sel = select_parameters(model, config.parameters) if config.spec.gradients else {}
        wparams = dict(work.named_parameters())
        with requiring_grad([wparams[n] for n in sel]):
            if sel:
                config = config.replace(parameters=tuple(sel))
            eng = Engine(work, config, device=dev, dtype=dt, predicted=predicted,
                         budget=resolve_budget(config.memory_budget, config.cache_bytes, dev))
            try:
                yield eng
            finally:
                eng.close()


# --------------------------------------------------------------------------------------------------
# Gram blocks and their accumulation
# --------------------------------------------------------------------------------------------------


def block_gram(c1: BlockCapture, c2: BlockCapture, full: bool, groups: bool = False
               ) -> Tensor | dict[str, Tensor]:
    """Gram block between two captured blocks: (B1, B2) trace over probes, or (B1, B2, M, M) if ``full``.

    With ``groups=True`` returns ``{layer group: block}`` (the kernel is the sum of its layer kernels).
    Cost per layer with one position: B1·B2·(d_in + M·d_out) multiply-adds; materialized groups
    B1·B2·M·p.
    """
    parts: dict[str, Tensor] = {}
    for a, b in zip(c1.caps, c2.caps):
        g = a.gram(b, full)  # type: ignore[arg-type]
        parts[a.group] = parts[a.group] + g if a.group in parts else g
    if groups:
        return parts
    vals = list(parts.values())
    out = vals[0]
    for v in vals[1:]:
        out = out + v
    return out


def block_sqnorms(c: BlockCapture, full: bool) -> Tensor:
    """The kernel's diagonal on one block, on the CPU: (B, M) squared norms of the per-example, per-probe
    gradients if ``full``, else their sum over probes (B,)."""
    vals = [cap.sqnorms() for cap in c.caps]
    out = vals[0]
    for v in vals[1:]:
        out = out + v
    return (out if full else out.sum(1)).cpu()


class Accumulator:
    """The (N1, N2[, M, M]) result (or one per layer group), filled block by block."""

    def __init__(self, n1: int, n2: int, full: bool) -> None:
        self.n1, self.n2, self.full = n1, n2, full
        self.outs: dict[str, Tensor] = {}

    def put(self, s1: int, s2: int, g: Tensor | dict[str, Tensor], sym: bool) -> None:
        """Write block ``g`` at rows ``s1``, columns ``s2`` (and its transpose when ``sym``)."""
        parts = g if isinstance(g, dict) else {"": g}
        for k, v in parts.items():
            if not torch.isfinite(v).all():
                raise NonFiniteError(f"NaN or infinite kernel values in layer group {k or 'all'!r}.")
            if k not in self.outs:
                self.outs[k] = torch.zeros((self.n1, self.n2, *v.shape[2:]), dtype=v.dtype)
            v = v.cpu()
            self.outs[k][s1 : s1 + v.shape[0], s2 : s2 + v.shape[1]] = v
            if sym and s1 != s2:
                vt = v.transpose(0, 1)
                if self.full:
                    vt = vt.transpose(2, 3)
                self.outs[k][s2 : s2 + v.shape[1], s1 : s1 + v.shape[0]] = vt

    def result(self, by_layer: bool) -> Tensor | dict[str, Tensor]:
        """The whole kernel, or ``{layer group: kernel}`` with ``by_layer``."""
        return self.outs if by_layer else self.outs[""]


def _cached(eng: Engine, src: Source, n: int) -> Captures | None:
    """All of ``src``'s captures when they fit the engine's cache budget (judged on the first block);
    else ``None`` (and nothing is kept)."""
    first = eng.captures(src)
    s0, c0 = next(first)
    if c0.nbytes() * math.ceil(n / max(c0.size, 1)) <= eng.budget.cache:
        return [(s0, c0)] + list(first)
    return None


def symmetric_pass(
    eng: Engine, src: Source, full: bool, by_layer: bool, keep: bool = False
) -> tuple[Accumulator, Tensor, Captures | None]:
    """K(src, src) block by block (upper triangle, mirrored) and its diagonal; with ``keep``, also the
    captures when they fit the engine's cache budget (else None)."""
    n = len(src)
    eng.n_cache = n
    acc = Accumulator(n, n, full)
    d_list: list[Tensor] = []

    def self_block(si: int, ci: BlockCapture) -> None:
        # the diagonal comes from the block's own Gram: no separate pass over the captures
        g = block_gram(ci, ci, full, by_layer)
        t = sum(g.values()) if isinstance(g, dict) else g
        d = torch.diagonal(torch.diagonal(t, 0, 0, 1), 0, 0, 1) if full else torch.diagonal(t)
        d_list.append(d.cpu().clone())
        acc.put(si, si, g, True)

    caps = _cached(eng, src, n)
    if caps is not None:
        for i, (si, ci) in enumerate(caps):
            self_block(si, ci)
            for sj, cj in caps[i + 1 :]:
                acc.put(si, sj, block_gram(ci, cj, full, by_layer), True)
    else:
        for si, ci in eng.captures(src):
            self_block(si, ci)
            for sj, cj in eng.captures(src, skip_before=si + ci.size):
                acc.put(si, sj, block_gram(ci, cj, full, by_layer), True)
    return acc, torch.cat(d_list), caps if keep else None


def cross_pass(
    eng: Engine,
    src1: Source,
    src2: Source,
    full: bool,
    by_layer: bool,
    caps2: Captures | None = None,
    d2: Tensor | None = None,
) -> tuple[Accumulator, Tensor, Tensor]:
    """K(src1, src2) and both diagonals; ``caps2``/``d2``: captures and diagonal of src2 already at hand."""
    acc = Accumulator(len(src1), len(src2), full)
    if eng.block is None:
        eng.n_cache = len(src2)
    if caps2 is None:
        caps2 = _cached(eng, src2, len(src2))
    d1_list: list[Tensor] = []
    d2_list: list[Tensor] = []
    if caps2 is not None and d2 is None:
        d2_list = [block_sqnorms(c, full) for _, c in caps2]
    for si, ci in eng.captures(src1):
        d1_list.append(block_sqnorms(ci, full))
        for sj, cj in caps2 if caps2 is not None else eng.captures(src2):
            if caps2 is None and si == 0 and d2 is None:
                d2_list.append(block_sqnorms(cj, full))
            acc.put(si, sj, block_gram(ci, cj, full, by_layer), False)
    return acc, torch.cat(d1_list), d2 if d2 is not None else torch.cat(d2_list)
