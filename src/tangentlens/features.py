"""Features: per-example feature rows whose inner products are the kernel, flat or projected.

The only room that knows both the captures (:mod:`tangentlens.capture`) and the projections
(:mod:`tangentlens.projection`). A :class:`Featurizer` holds one engine over a private working copy of the
model for any number of blocks; between blocks nothing is left installed on the caller's model (modes,
``requires_grad`` flags and hooks are set for each block's capture and restored before it is returned).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .blocks import cosine_normalize
from .capture import BlockCapture, DenseCap, OuterCap
from .config import KernelConfig
from .engine import Engine
from .errors import InputError, NonFiniteError
from .inputs import Block, Source
from .memory import check_memory, resolve_budget
from .network import HookStash, check_materialized, eval_mode, place, requiring_grad, select_parameters
from .projection import LayerFactors, Projection


class Featurizer:
    """Feature rows of blocks of examples for one model and configuration (a context manager).

    ``with Featurizer(model, config) as f: for start, rows in f.blocks(x): ...`` — or
    :meth:`transform` of one :class:`~tangentlens.inputs.Block` at a time (what a distributed worker does).
    The first block plans the block size from the memory budget and runs
    the first-block checks; their decisions (materialized layers, fallbacks) hold for every later block.

    Rows are (B, M·P) for the trace kinds (probe-major, parameters in ``named_parameters`` order), (B, C, P)
    for ``"entk"``, (B, P) for the one-probe kinds, and (B, M·K) / (B, C, K) with a projection; scaled to
    unit norm when the config normalizes. Rows are returned on the CPU.

    Args:
        model: the network (left untouched between blocks; a differing ``dtype``/``device`` works on one
            private copy).
        config: the configuration (kind, parameters, projection, dtype, device, budget).
        predicted: use the network's predicted labels (the label kinds with ``labels="predicted"``).
        block_size: examples per capture, instead of the size the memory plan picks (the plan still runs its
            first-block checks). Captures of the same rows in the same block sizes are bit-identical, so a
            resumed featurization that records and reuses the block size reproduces an uninterrupted one.

    Raises:
        DeviceError, ParameterSelectionError: at construction.
    """

    def __init__(
        self,
        model: nn.Module,
        config: KernelConfig,
        *,
        predicted: bool = False,
        block_size: int | None = None,
    ) -> None:
        check_materialized(model)
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1):
            raise InputError(f"block_size must be a positive integer; got {block_size!r}.")
        self.block_size = block_size
        self.config = config
        self.model = model
        self.predicted = predicted
        self._selected = select_parameters(model, config.parameters) if config.spec.gradients else {}
        self._work: nn.Module | None = None
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._engine: Engine | None = None
        self._hooks: HookStash | None = None

    # ----------------------------------------------------------------------------------------------
    def __enter__(self) -> Featurizer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the engine's hooks (they are stashed between blocks already; this frees them)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    # ----------------------------------------------------------------------------------------------
    def blocks(self, data: Any, labels: Any = None) -> Iterator[tuple[int, Tensor]]:
        """``(start_row, rows)`` of every block of ``data`` in order, split to the planned block size.

        Args:
            data: what :func:`tangentlens.features` takes (tensor, dict of tensors, (inputs, labels) pair,
                Dataset, non-shuffling DataLoader), read in blocks of the config's ``batch_size``.
            labels: labels for the label kinds (a tensor; ``"predicted"`` is the constructor's ``predicted``).
        """
        for sub in self._planned(self._source(data, labels)):
            yield sub.start, self.transform(sub)

    def features(self, data: Any, labels: Any = None) -> Tensor:
        """All feature rows of ``data`` as one ``(N, ...)`` tensor (what :func:`tangentlens.features` gives).

        The result is allocated when the first block's rows are known; every later block is written in
        place into its rows (no per-block result, no copy: for projected features of the method's MLP the
        per-block results and their copy took ~15% of the time). Same rows as :meth:`blocks`.

        Raises:
            MemoryBudgetError: the ``(N, ...)`` result does not fit in the memory available (checked
                before it is allocated).
        """
        src = self._source(data, labels)
        out: Tensor | None = None
        for sub in self._planned(src):
            if out is not None:
                self.transform(sub, out=out[sub.start : sub.start + sub.size])
                continue
            rows = self.transform(sub)
            shape = (len(src), *rows.shape[1:])
            check_memory(
                math.prod(shape) * rows.element_size(), rows.device, f"the {tuple(shape)} features result",
                "stream the rows with tl.iter_features(...) instead, pass fewer examples, or project the "
                "features to fewer dimensions (projection=Projection(K) with a smaller K)",
            )
            out = rows.new_empty(shape)
            out[sub.start : sub.start + rows.shape[0]] = rows
        if out is None:
            raise InputError("no examples to featurize (the data is empty).")
        return out

    def _source(self, data: Any, labels: Any) -> Source:
        return data if isinstance(data, Source) else Source(data, self.config.batch_size, labels, "inputs")

    def _planned(self, src: Source) -> Iterator[Block]:
        """The blocks of ``src`` split to the planned block size."""
        for blk in src.blocks():
            with self._attached():
                size = self._ensure_engine().plan(blk)
            yield from blk.split(size)

    @property
    def planned_block_size(self) -> int | None:
        """Examples per capture once the first block has been planned (``None`` before)."""
        return None if self._engine is None else self._engine.block

    def transform(self, blk: Block, out: Tensor | None = None) -> Tensor:
        """Feature rows of one block (the first block plans the block size; later ones should fit it).

        Args:
            blk: the block.
            out: a CPU tensor of the rows' shape and dtype to write them into (e.g. the block's rows of a
                larger result), returned; projected rows are computed in place there.

        Raises:
            InputError: ``out`` of another shape or dtype than the rows.
        """
        with self._attached():
            eng = self._ensure_engine()
            eng.plan(blk)
            cap = eng.capture(blk.x, blk.y)
            rows = self._rows_of(cap, out)
            del cap
        return rows

    # ----------------------------------------------------------------------------------------------
    def _ensure_engine(self) -> Engine:
        if self._engine is None:
            assert self._work is not None
            proj = self.config.projection
            materialize = "kronecker" if proj is not None and proj.uses_factors else "all"
            cfg = self.config.replace(parameters=tuple(self._selected)) if self._selected else self.config
            self._engine = Engine(
                self._work, cfg, device=self._device, dtype=self._dtype, predicted=self.predicted,
                budget=resolve_budget(self.config.memory_budget, None, self._device), materialize=materialize,
                block_size=self.block_size,
            )
        return self._engine

    @contextmanager
    def _attached(self) -> Iterator[None]:
        """The working model in eval mode, the selected parameters requiring grad and the engine's hooks
        installed; all restored (hooks stashed) on exit."""
        if self._work is None:
            self._work, self._device, self._dtype = place(
                self.model, device=self.config.device, dtype=self.config.torch_dtype)
            self._hooks = HookStash(self._work)
        wparams = dict(self._work.named_parameters())
        hooks = self._hooks
        assert hooks is not None
        with eval_mode(self.model, self._work), requiring_grad([wparams[n] for n in self._selected]):
            if self._engine is None:
                hooks.mark()
            else:
                hooks.restore()
            try:
                yield
            finally:
                hooks.stash()

    def _rows_of(self, cap: BlockCapture, out: Tensor | None = None) -> Tensor:
        spec, norm, proj = self.config.spec, self.config.normalized, self.config.projection
        if proj is None:
            mats: dict[str, Tensor] = {}
            for c in cap.caps:
                mats.update(c.materialize())
            keys = list(self._selected) if self._selected else list(mats)
            return feature_rows(torch.cat([mats[k] for k in keys], dim=2), spec.full, norm, out)
        assert self._work is not None
        wparams = dict(self._work.named_parameters())
        sizes = {n: wparams[n].numel() for n in self._selected}
        into, m = None, _probes_of(cap)
        if (out is not None and out.device == self._device and out.dtype == (proj.dtype or self._dtype)
                and out.is_contiguous() and out.shape[0] == cap.size and out[0].numel() % m == 0):
            into = out.view(cap.size, m, -1)  # (B, M, K): the projection adds its parts there
        return feature_rows(project_capture(cap, sizes, proj, into), spec.full, norm, out)


def feature_rows(G: Tensor, full: bool, norm: bool, out: Tensor | None = None) -> Tensor:
    """Per-example feature rows from (B, M, D) per-probe features: (B, M, D) for a full kind, else (B, M·D);
    with ``norm``, scaled to unit norm (per probe for a full kind). Returned on the CPU, in ``out`` when
    given (``G`` may already be ``out``'s memory: then scaled in place).

    Raises:
        InputError: ``out`` of another shape or dtype than the rows.
    """
    if not full:
        G = G.reshape(G.shape[0], -1)
    if out is not None and (tuple(out.shape) != tuple(G.shape) or out.dtype != G.dtype):
        raise InputError(
            f"out must be a {tuple(G.shape)} {G.dtype} tensor; got {tuple(out.shape)} {out.dtype}.")
    own = out is not None and G.device == out.device and G.data_ptr() == out.data_ptr()
    if norm:
        scale = G.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)
        G = G.div_(scale) if own else G / scale
    if out is None:
        return G.cpu()
    return out if own else out.copy_(G)


def project_capture(
    cap: BlockCapture, sizes: dict[str, int], proj: Projection, out: Tensor | None = None
) -> Tensor:
    """(B, M, K') projected per-probe features of one block (written into ``out`` when given and the kind sums
    its parts in ``K`` coordinates; else a new tensor).

    Linear/Conv layers kept factored (``proj.uses_factors``) are projected from their factors: with
    :meth:`~tangentlens.projection.Projection.project_kronecker` (``"kronecker"``; its ``k_out k_in``
    features concatenated unless ``fold``), or all in one
    :meth:`~tangentlens.projection.Projection.project_layers` call where
    :meth:`~tangentlens.projection.Projection.takes_factors` (``"khatri_rao"``; dense kinds with several
    probes and one position). Every other parameter slice is materialized and projected at its global column
    offset (``sizes``: the selected parameters' sizes in order), maximal runs of adjacent slices per call, in
    steps of rows that keep the materialized gradients near 2**24 entries (rows never depend on the step).
    """
    offsets: dict[str, int] = {}
    total = 0
    for n, k in sizes.items():
        offsets[n] = total
        total += k
    B, M = cap.size, _probes_of(cap)
    acc: Tensor | None = None  # (B, M, K): the parts summed in K coordinates
    kron: list[Tensor] = []
    rest: list[Any] = []  # captures whose gradients are materialized
    layers: list[LayerFactors] = []  # Linear/Conv layers projected from their factors
    extra: dict[str, Tensor] = {}  # biases of Kronecker layers, (B, M, d_out)
    for c in cap.caps:
        if proj.uses_factors and isinstance(c, OuterCap):
            T, d_in, d_out = c.a.shape[1], c.a.shape[2], c.delta.shape[3]
            f: Tensor | None = None
            if proj.kind == "kronecker" and c.weight is not None:
                f = proj.project_kronecker(c.a, c.delta, c.weight, d_in=d_in, d_out=d_out, total_dim=total)
                if c.bias is not None:
                    extra[c.bias] = c.delta.sum(2)
                if not proj.fold:
                    kron.append(f)
                    continue
            elif proj.kind != "kronecker" and proj.takes_factors(d_in, d_out, T, M):
                layers.append(LayerFactors(c.a, c.delta, c.group, offsets[c.weight] if c.weight else None,
                                           offsets[c.bias] if c.bias else None))
                continue
            if f is not None:
                acc = f if acc is None else acc.add_(f)
                continue
        rest.append(c)
    if layers:  # all together: "khatri_rao" keeps a chunk of rows in cache across the layers
        if acc is None and out is not None and out.shape[2] == proj.dim:  # written into out, summed there
            acc = proj.project_layers(layers, total_dim=total, out=out, add=False)
        else:
            acc = proj.project_layers(layers, total_dim=total, out=acc)

    def names_of(c: Any) -> tuple[str, ...]:  # what c.materialize() returns
        if isinstance(c, DenseCap):
            return tuple(c.grads)
        if isinstance(c, OuterCap):
            return tuple(n for n in (c.weight, c.bias) if n)
        return (c.weight,)

    def rows_of(c: Any, r0: int, r1: int) -> Any:  # the capture of rows [r0, r1)
        if r0 == 0 and r1 == B:
            return c
        if isinstance(c, DenseCap):
            return replace(c, grads={k: v[r0:r1] for k, v in c.grads.items()})
        if isinstance(c, OuterCap):
            return replace(c, a=c.a[r0:r1], delta=c.delta[r0:r1])
        return replace(c, idx=c.idx[r0:r1], delta=c.delta[r0:r1])

    owned = {n for c in rest for n in names_of(c)}
    names = [n for n in sizes if n in extra or n in owned]
    if not names:
        parts = kron + ([acc] if acc is not None else [])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    width = sum(sizes[n] for n in names if n not in extra)  # materialized entries per row and probe
    step = max(1, min(B, 2**24 // max(M * width, 1)))
    steps: list[Tensor] = []
    for r0 in range(0, B, step):
        r1 = min(B, r0 + step)
        slices = {k: v[r0:r1] for k, v in extra.items()}
        for c in rest:
            slices.update(rows_of(c, r0, r1).materialize())
        flat = None if acc is None else acc[r0:r1].reshape((r1 - r0) * M, -1)  # a view: added in place
        run: list[Tensor] = []
        run_start = 0
        for i, n in enumerate(names):
            if not run:
                run_start = offsets[n]
            run.append(slices[n].reshape((r1 - r0) * M, -1))
            nxt = names[i + 1] if i + 1 < len(names) else None
            if nxt is None or offsets[nxt] != offsets[n] + sizes[n]:
                g = run[0] if len(run) == 1 else torch.cat(run, 1)
                pr = proj.project(g, run_start, total)
                flat = pr if flat is None else flat.add_(pr)
                run = []
        assert flat is not None
        steps.append(flat)
    if acc is None:
        acc = (steps[0] if len(steps) == 1 else torch.cat(steps)).reshape(B, M, -1)
    parts = kron + [acc]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _probes_of(cap: BlockCapture) -> int:
    """M, the probes per example of a gradient capture."""
    for c in cap.caps:
        if isinstance(c, DenseCap):
            if c.grads:
                return next(iter(c.grads.values())).shape[1]
        else:
            return c.delta.shape[1]
    raise InputError("a projection needs gradients: the capture holds none (no parameters selected?).")


def feature_gram(F1: Tensor, F2: Tensor | None, full: bool) -> Tensor:
    """Φ1 Φ2ᵀ of feature rows (Φ1 Φ1ᵀ when ``F2`` is None): (N1, N2), or (N1, N2, M, M) for a full kind.

    Raises:
        NonFiniteError: NaN or infinite values.
    """
    F2 = F1 if F2 is None else F2
    K = torch.einsum("imk,jnk->ijmn", F1, F2) if full else F1 @ F2.T
    if not torch.isfinite(K).all():
        raise NonFiniteError("NaN or infinite projected kernel values.")
    return K


def feature_sqnorms(F: Tensor) -> Tensor:
    """The kernel's diagonal from feature rows: (N,) squared row norms ((N, M) per probe for a full kind)."""
    return (F * F).sum(-1)


def feature_kernel(F1: Tensor, F2: Tensor | None, full: bool, norm: bool) -> Tensor:
    """Φ1 Φ2ᵀ (Φ1 Φ1ᵀ if ``F2`` is None, with an exact unit diagonal), cosine-normalized on request."""
    K = feature_gram(F1, F2, full)
    if norm:
        d1 = feature_sqnorms(F1)
        cosine_normalize(K, d1, d1 if F2 is None else feature_sqnorms(F2), unit_diagonal=F2 is None)
    return K
