"""The functional core: ``kernel`` and ``features``.

Both stream the data in blocks: a block of examples is captured once (one batched forward, one batched
backward per output probe, see :mod:`tangentlens.capture`), Gram blocks are formed from the compact captures,
and only the (N1, N2) result — never N·C·P floats — is held whole. Captures of the second argument are cached
while they fit ``cache_bytes`` and recomputed per block otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .capture import ActivationCapture, BlockCapture, DenseCap, GradientCapture, OuterCap
from .errors import InputError, MemoryBudgetWarning, NonFiniteError
from .inputs import Batch, Block, Source, batch_size_of, move_batch
from .kinds import KindSpec, block_gram, block_sqnorms, check_options, cosine_normalize, kind_spec
from .memory import Budget, check_memory, format_bytes, resolve_budget
from .network import (
    HookStash,
    ParameterSpec,
    check_materialized,
    eval_mode,
    place,
    prepared,
    requiring_grad,
    resolve_device,
    select_parameters,
)
from .probes import LabelSpec, check_label_modes, labels_mode, make_probe_fn
from .projection import Projection

DEFAULT_CACHE_BYTES: int | None = None  # None: half of the memory budget
DEFAULT_MEMORY_BUDGET: int | None = None  # None: a quarter of the memory available when the call starts


# --------------------------------------------------------------------------------------------------
# The engine: one prepared model, one capturer, blocks of examples
# --------------------------------------------------------------------------------------------------


class _Engine:
    """One prepared model, one capturer, and the plan that sizes its blocks from the memory budget.

    ``limit`` is the caller's ``batch_size``; ``materialize`` says what the consumer of the captures
    needs ("chosen": kernels, "all": flat features, "kronecker": Kronecker-projected features).
    ``n_cache`` (set by the kernel assembly before the first block) is how many examples' captures may
    be kept at once.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: KindSpec,
        *,
        parameters: ParameterSpec,
        device: torch.device,
        dtype: torch.dtype,
        probes: int | Tensor | None,
        probe_seed: int,
        predicted: bool,
        modules: Sequence[str | nn.Module] | None,
        budget: Budget,
        limit: int,
        verify: bool = True,
        materialize: str = "chosen",
        implementation: str = "auto",
    ) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.budget = budget
        self.limit = limit
        self.materialize = materialize
        self.n_cache = 0
        self.block: int | None = None  # examples per capture, planned on the first block
        self._pending: tuple[Batch, BlockCapture] | None = None  # the first block, captured by the plan
        if spec.probes == "none":
            self.acts: ActivationCapture | None = ActivationCapture(model, spec.name, modules)
            self.grads: GradientCapture | None = None
            self.params: dict[str, nn.Parameter] = {}
        else:
            self.acts = None
            self.params = select_parameters(model, parameters)
            fn = make_probe_fn(spec, probes, probe_seed, predicted)
            self.grads = GradientCapture(model, self.params, fn, verify=verify,
                                         keep_factors=materialize == "kronecker",
                                         implementation=implementation)

    def capture(self, x: Batch, y: Tensor | None) -> BlockCapture:
        if self._pending is not None and self._pending[0] is x:  # captured whole by the planning trial
            cap, self._pending = self._pending[1], None
            return cap
        x = move_batch(x, self.device, self.dtype)
        if self.acts is not None:
            return self.acts.capture(x)
        assert self.grads is not None
        return self.grads.capture(x, y)

    def blocks(self, src: Source, skip_before: int = 0) -> Iterator[Block]:
        """``src``'s blocks, split to the planned size; those ending at or before ``skip_before`` skipped."""
        for blk in src.blocks():
            if self.block is None:
                self._plan(blk)
            assert self.block is not None
            for sub in blk.split(self.block):
                if sub.start + sub.size > skip_before:
                    yield sub

    def _plan(self, blk: Block) -> None:
        if self.grads is None:
            self.block = self.limit
            return
        x = move_batch(blk.x, self.device, self.dtype)
        plan = self.grads.plan(
            x, blk.y, limit=self.limit, n_cache=self.n_cache, cache_budget=self.budget.cache,
            work_budget=self.budget.work, materialize=self.materialize, trial=self._trial_size(x),
        )
        self.block = plan.block
        if plan.capture is not None:
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
            warnings.warn(
                f"To stay within its memory budget of {format_bytes(self.budget.total)} the call "
                f"{' and '.join(what)}. Pass memory_budget= (bytes) to change the budget.",
                MemoryBudgetWarning,
                stacklevel=5,
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
        if self.acts is not None:
            self.acts.close()
        if self.grads is not None:
            self.grads.__exit__()


_WHOLE_TRIAL = 64  # first blocks up to this size are planned from their own capture (no separate trial)


def _validate_common(
    kind: str,
    batch_size: int,
    normalize: bool | None,
    device: torch.device | str | None,
    **options: Any,
) -> tuple[KindSpec, bool]:
    """Check the arguments shared by :func:`kernel`, :func:`train_test_kernels`, :func:`features` and
    :func:`iter_features`; return (spec, normalize).

    ``options`` are the kind-specific options the caller passed (``parameters``, ``projection``,
    ``probes``, ``probe_seed``, labels, ``modules``): one with a non-default value that the kind does not
    accept (``KindSpec.options``) is an error naming the kinds it applies to.

    Raises:
        UnknownKindError, InputError, DeviceError.
    """
    spec = kind_spec(kind)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}.")
    check_options(spec, **options)
    resolve_device(device)
    return spec, spec.normalize if normalize is None else bool(normalize)


def kernel(
    model: nn.Module,
    inputs: Any,
    other: Any = None,
    *,
    kind: str = "trntk",
    normalize: bool | None = None,
    parameters: ParameterSpec = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    labels: LabelSpec = None,
    other_labels: LabelSpec = None,
    probes: int | Tensor | None = None,
    probe_seed: int = 0,
    modules: Sequence[str | nn.Module] | None = None,
    by_layer: bool = False,
    cache_bytes: int | None = DEFAULT_CACHE_BYTES,
    projection: Projection | None = None,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    implementation: str = "auto",
) -> Tensor | dict[str, Tensor]:
    r"""Empirical kernel of a trained network between ``inputs`` and ``other`` (or ``inputs`` itself).

    Let g_c(x) = ∇_θ f_c(x) (logits f, parameters θ, eval mode). Kinds:

    * ``"entk"``: Θ(x, x')_{cc'} = ⟨g_c(x), g_c'(x')⟩, shape (N1, N2, C, C); ``normalize=True`` makes each
      entry the cosine of g_c(x) and g_c'(x'). Default unnormalized.
    * ``"trntk0"``: Σ_c ⟨g_c(x), g_c(x')⟩ = Tr Θ(x, x'). Default unnormalized.
    * ``"trntk"``: trNTK⁰ cosine-normalized (the cosine of the concatenated Jacobians). Default normalized.
    * ``"pntk"``: (1/C)⟨Σ_c g_c(x), Σ_c g_c(x')⟩ (the gradient of the summed logits, scaled by 1/√C so that
      pNTK = trNTK⁰/C when the g_c are orthogonal). The reference code omits the 1/C; cosine
      normalization (``normalize=True``) cancels it. Default unnormalized.
    * ``"gradcos"``: cosine of loss gradients ∇_θ L(x, y) (cross-entropy; binary cross-entropy for one
      logit). Needs labels for *both* sides — for test points that leaks their labels into a surrogate;
      ``labels="predicted"`` uses the network's own predictions instead.
    * ``"margin"``: ⟨∇_θ m(x, y), ∇_θ m(x', y')⟩ of TRAK's margin m = f_y − logsumexp_{c≠y} f_c
      = log(p_y / (1 − p_y)); for one logit m = f if y = 1 and −f if y = 0 (the same log-odds of the
      label). Needs labels for both sides (true labels are the attribution target, not warned about;
      both sides use true labels or both ``"predicted"``). Default unnormalized: it is the kernel of
      :func:`tangentlens.attribute`.
    * ``"em"``: Σ_ℓ ⟨a_ℓ(x), a_ℓ(x')⟩ over flattened outputs of ``modules`` (default: every Linear, Conv and
      Embedding layer except the last Linear), cosine-normalized.
    * ``"ck"``: ⟨h(x), h(x')⟩ of the input of the last Linear layer (penultimate features), cosine-normalized.

    Normalization is block-aware: a block is divided by sqrt of the ``inputs`` diagonal on rows and of the
    ``other`` diagonal on columns, so a normalized self-kernel has an exact unit diagonal.

    Args:
        model: a network returning logits (B, C) (tensor, tuple, or object with ``.logits``). It is used in
            eval mode (BatchNorm running statistics, dropout off); every submodule's mode is restored.
        inputs: tensor (N, ...), dict of tensors, (inputs, labels) pair, Dataset or non-shuffling DataLoader.
        other: second data set (columns); ``None`` means ``inputs`` × ``inputs``.
        kind: one of the kinds above.
        normalize: block-aware cosine normalization; ``None`` takes the kind's default.
        parameters: parameter subset (names, module names, modules or parameters); default all trainable.
        batch_size: examples per block; memory is bounded by blocks, never N·C·P floats.
        device: compute device (default: the model's). The result is returned on the CPU.
        dtype: compute dtype (default: the model's, typically float32; ``torch.float64`` for exactness).
            A differing device or dtype works on a copy of the model.
        labels, other_labels: labels for ``gradcos`` and ``margin`` (or ``"predicted"``).
        probes: sketched trace over outputs: m Rademacher probes (unbiased for trNTK⁰) or an (M, C) tensor.
        probe_seed: seed of the Rademacher probes.
        modules: modules for ``"em"``.
        by_layer: return ``{layer group: unnormalized kernel}`` whose sum is the unnormalized kernel.
        cache_bytes: keep the captures of ``other`` (or of ``inputs`` for a symmetric kernel) in memory up
            to this many bytes, else recompute them per block; None (default): half of ``memory_budget``.
        projection: a :class:`tangentlens.sketch.Projection` R (K×P): the kernel of projected features
            φ_c(x) = R g_c(x), one R shared by every class and normalized *after* summing over classes —
            ``kind="trntk"`` gives proj-trNTK, ``kind="pntk", normalize=True`` proj-pNTK. Projected
            features of both sides are formed block by block (N·M·K floats) and multiplied.
        implementation: how per-example gradients are computed: "auto" (default; layer rules — factored
            Linear/Conv/Embedding/norm gradients, checked on the first block — and the ``torch.func``
            fallback for every other parameter), "hooks" (layer rules only; a parameter needing the
            fallback is an UnsupportedLayerError) or "functional" (every parameter through ``torch.func``
            per-example vector-Jacobian products: slower, independent of the rules; the tests cross-check
            the two).
        memory_budget: bytes the call may use beyond its inputs, model and result; None (default): a
            quarter of the memory available at the call on ``device`` (at least 512 MiB). Half bounds the
            cached captures, half one block's working set; blocks are split (within ``batch_size``) and
            layers kept factored to fit, said once by a :class:`~tangentlens.errors.MemoryBudgetWarning`.

    Returns:
        (N1, N2) tensor ((N1, N2, C, C) for ``"entk"``), or a dict of them with ``by_layer``.

    Cost: per block one forward and M backward passes (M = C for the trace kinds, 1 for pNTK and Grad-Cos);
    per pair of blocks and layer with one position 2·B1·B2·(d_in + M·d_out) flops. Memory: the result, plus
    captures (≈ N2·Σ_layers(d_in + M·d_out) floats for an MLP) while they fit ``cache_bytes``, plus one
    block's working set within ``memory_budget``. The first block's planning capture (the whole block for
    a small call on a small model, else 4 examples) measures the per-example memory and runs the
    first-block checks.

    Raises:
        UnknownKindError, InputError, ModelOutputError, ParameterSelectionError, NonFiniteError. Among the
        InputErrors: ModelCallError (the model's forward raised on a block: wrong input shape or dtype),
        DeviceError (``device`` unavailable, or ``meta``), MemoryBudgetError (a projection's working set
        does not fit), and an option the kind does not use (e.g. ``modules=`` with ``kind="trntk"``).
    """
    spec, norm = _validate_common(
        kind, batch_size, normalize, device, parameters=parameters, projection=projection, probes=probes,
        probe_seed=probe_seed, labels=labels, other_labels=other_labels, modules=modules,
        implementation=implementation,
    )
    if other is inputs and (other_labels is labels or (isinstance(labels, str) and other_labels == labels)):
        other, other_labels = None, None  # K(x, x): the symmetric case (upper triangle, one capture pass)
    lab1, pred1 = labels_mode(labels)
    lab2, pred2 = labels_mode(other_labels)
    src1 = Source(inputs, batch_size, lab1, "inputs")
    if spec.needs_labels and other is not None:
        check_label_modes(src1, pred1, pred2, ("labels", "other_labels"), warn=spec.name == "gradcos")
    if projection is not None:
        return _projected_kernel(
            model, inputs, other, spec=spec, norm=norm, parameters=parameters, batch_size=batch_size,
            device=device, dtype=dtype, labels=labels, other_labels=other_labels, probes=probes,
            probe_seed=probe_seed, projection=projection, by_layer=by_layer, memory_budget=memory_budget,
            implementation=implementation,
        )
    src2 = Source(other, batch_size, lab2, "other") if other is not None else None
    predicted = pred1 or (pred2 and src2 is not None)
    with _engine(
        model, spec, parameters=parameters, device=device, dtype=dtype, probes=probes, probe_seed=probe_seed,
        predicted=predicted, modules=modules, memory_budget=memory_budget, cache_bytes=cache_bytes,
        batch_size=batch_size, implementation=implementation,
    ) as eng:
        return _assemble(eng, src1, src2, spec, norm, by_layer)


def train_test_kernels(
    model: nn.Module,
    train: Any,
    test: Any,
    *,
    kind: str = "trntk",
    normalize: bool | None = None,
    parameters: ParameterSpec = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    labels: LabelSpec = None,
    test_labels: LabelSpec = None,
    probes: int | Tensor | None = None,
    probe_seed: int = 0,
    modules: Sequence[str | nn.Module] | None = None,
    by_layer: bool = False,
    cache_bytes: int | None = DEFAULT_CACHE_BYTES,
    projection: Projection | None = None,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    implementation: str = "auto",
) -> tuple[Tensor, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The two blocks a kernel surrogate needs, K(train, train) and K(test, train), in one pass.

    Equal to ``kernel(model, train, labels=labels, ...)`` and
    ``kernel(model, test, train, labels=test_labels, other_labels=labels, ...)`` (same arguments
    otherwise), but every training example's gradients are captured once and serve both blocks (when
    the captures fit ``cache_bytes``), and the training diagonal of the symmetric block also normalizes
    the cross block. The test × test block is never formed.

    Args:
        model, kind, normalize, parameters, batch_size, device, dtype, probes, probe_seed, modules,
            by_layer, cache_bytes, projection, memory_budget, implementation: as in :func:`kernel`.
        train: the training examples (rows and columns of the first block, columns of the second).
        test: the examples to explain (rows of the second block).
        labels: labels of ``train`` for ``"gradcos"`` and ``"margin"`` (or ``"predicted"``).
        test_labels: labels of ``test`` for ``"gradcos"``: the network's ``"predicted"`` labels for an
            honest surrogate; true test labels leak into it (warned). For ``"margin"``: the labels whose
            margins are attributed (true or ``"predicted"``, the same mode as ``labels``).

    Returns:
        ``(K_train_train, K_test_train)``: (N, N) and (T, N) (with the class axes for ``"entk"``), or two
        ``{layer group: kernel}`` dicts with ``by_layer``.

    Cost: one forward and M backward passes per training and per test block (the captures of the
    training side are recomputed per test block only if they do not fit ``cache_bytes``); Gram work
    N²/2 + T·N block pairs.

    Raises:
        As :func:`kernel`.
    """
    spec, norm = _validate_common(
        kind, batch_size, normalize, device, parameters=parameters, projection=projection, probes=probes,
        probe_seed=probe_seed, labels=labels, test_labels=test_labels, modules=modules,
        implementation=implementation,
    )
    lab_tr, pred_tr = labels_mode(labels)
    lab_te, pred_te = labels_mode(test_labels)
    src_te = Source(test, batch_size, lab_te, "test")
    if spec.needs_labels:
        check_label_modes(src_te, pred_te, pred_tr, ("test_labels", "labels"),
                              warn=spec.name == "gradcos")
    if projection is not None:
        if by_layer:
            raise InputError("by_layer=True is not available with a projection (features mix the layers).")
        kw: dict[str, Any] = dict(
            kind=spec.name, normalize=False, projection=projection, parameters=parameters,
            batch_size=batch_size, device=device, dtype=dtype, probes=probes, probe_seed=probe_seed,
            memory_budget=memory_budget, implementation=implementation,
        )
        F_tr = features(model, train, labels=labels, **kw)
        F_te = features(model, test, labels=test_labels, **kw)
        return _feature_kernel(F_tr, None, spec, norm), _feature_kernel(F_te, F_tr, spec, norm)
    src_tr = Source(train, batch_size, lab_tr, "train")
    with _engine(
        model, spec, parameters=parameters, device=device, dtype=dtype, probes=probes, probe_seed=probe_seed,
        predicted=pred_tr, modules=modules, memory_budget=memory_budget, cache_bytes=cache_bytes,
        batch_size=batch_size, implementation=implementation,
    ) as eng:
        acc, d_tr, caps = _symmetric(eng, src_tr, spec.full, by_layer, keep=True)
        K_tr = _finish(acc, d_tr, d_tr, norm, by_layer, True)
        acc2, d_te, _ = _cross(eng, src_te, src_tr, spec.full, by_layer, caps2=caps, d2=d_tr)
        return K_tr, _finish(acc2, d_te, d_tr, norm, by_layer, False)  # type: ignore[return-value]


@contextmanager
def _engine(
    model: nn.Module,
    spec: KindSpec,
    *,
    parameters: ParameterSpec,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    probes: int | Tensor | None,
    probe_seed: int,
    predicted: bool,
    modules: Sequence[str | nn.Module] | None,
    memory_budget: int | None,
    cache_bytes: int | None,
    batch_size: int,
    implementation: str = "auto",
) -> Iterator[_Engine]:
    """An engine on the prepared (eval-mode, placed) model; everything is restored on exit."""
    with prepared(model, device=device, dtype=dtype) as (work, dev, dt):
        sel = select_parameters(model, parameters) if spec.probes != "none" else {}
        wparams = dict(work.named_parameters())
        with requiring_grad([wparams[n] for n in sel]):
            eng = _Engine(
                work, spec, parameters=list(sel) if sel else None, device=dev, dtype=dt, probes=probes,
                probe_seed=probe_seed, predicted=predicted, modules=modules,
                budget=resolve_budget(memory_budget, cache_bytes, dev), limit=batch_size,
                implementation=implementation,
            )
            try:
                yield eng
            finally:
                eng.close()


def _iter_caps(eng: _Engine, src: Source, skip_before: int = 0) -> Iterator[tuple[int, BlockCapture]]:
    for blk in eng.blocks(src, skip_before):
        yield blk.start, eng.capture(blk.x, blk.y)


class _Accumulator:
    """The (N1, N2[, M, M]) result (or one per layer group), filled block by block."""

    def __init__(self, n1: int, n2: int, full: bool) -> None:
        self.n1, self.n2, self.full = n1, n2, full
        self.outs: dict[str, Tensor] = {}

    def put(self, s1: int, s2: int, g: Tensor | dict[str, Tensor], sym: bool) -> None:
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


def _sqnorms(c: BlockCapture, full: bool) -> Tensor:
    d = block_sqnorms(c)
    return (d if full else d.sum(1)).cpu()


def _symmetric(
    eng: _Engine, src: Source, full: bool, by_layer: bool, keep: bool = False
) -> tuple[_Accumulator, Tensor, list[tuple[int, BlockCapture]] | None]:
    """K(src, src) block by block (upper triangle, mirrored) and its diagonal; with ``keep``, also the
    captures when they fit the engine's cache budget (else None)."""
    n = len(src)
    eng.n_cache = n
    cache_bytes = eng.budget.cache
    acc = _Accumulator(n, n, full)
    d_list: list[Tensor] = []

    def self_block(si: int, ci: BlockCapture) -> None:
        # the diagonal comes from the block's own Gram: no separate pass over the captures
        g = block_gram(ci, ci, full, by_layer)
        t = sum(g.values()) if isinstance(g, dict) else g
        d = torch.diagonal(torch.diagonal(t, 0, 0, 1), 0, 0, 1) if full else torch.diagonal(t)
        d_list.append(d.cpu().clone())
        acc.put(si, si, g, True)

    first = _iter_caps(eng, src)
    s0, c0 = next(first)
    n_blocks = math.ceil(n / max(c0.size, 1))
    caps: list[tuple[int, BlockCapture]] | None = None
    if c0.nbytes() * n_blocks <= cache_bytes:
        caps = [(s0, c0)] + list(first)
        for i, (si, ci) in enumerate(caps):
            self_block(si, ci)
            for sj, cj in caps[i + 1 :]:
                acc.put(si, sj, block_gram(ci, cj, full, by_layer), True)
    else:
        del first, c0
        for si, ci in _iter_caps(eng, src):
            self_block(si, ci)
            for sj, cj in _iter_caps(eng, src, skip_before=si + ci.size):
                acc.put(si, sj, block_gram(ci, cj, full, by_layer), True)
    return acc, torch.cat(d_list), caps if keep else None


def _cross(
    eng: _Engine,
    src1: Source,
    src2: Source,
    full: bool,
    by_layer: bool,
    caps2: list[tuple[int, BlockCapture]] | None = None,
    d2: Tensor | None = None,
) -> tuple[_Accumulator, Tensor, Tensor]:
    """K(src1, src2) and both diagonals; ``caps2``/``d2``: captures and diagonal of src2 already at hand."""
    acc = _Accumulator(len(src1), len(src2), full)
    if eng.block is None:
        eng.n_cache = len(src2)
    cache_bytes = eng.budget.cache
    if caps2 is None:
        first2 = _iter_caps(eng, src2)
        s0, c0 = next(first2)
        if c0.nbytes() * math.ceil(len(src2) / max(c0.size, 1)) <= cache_bytes:
            caps2 = [(s0, c0)] + list(first2)
        else:
            del first2, c0
    d1_list: list[Tensor] = []
    d2_list: list[Tensor] = []
    if caps2 is not None and d2 is None:
        d2_list = [_sqnorms(c, full) for _, c in caps2]
    for si, ci in _iter_caps(eng, src1):
        d1_list.append(_sqnorms(ci, full))
        for sj, cj in caps2 if caps2 is not None else _iter_caps(eng, src2):
            if caps2 is None and si == 0 and d2 is None:
                d2_list.append(_sqnorms(cj, full))
            acc.put(si, sj, block_gram(ci, cj, full, by_layer), False)
    return acc, torch.cat(d1_list), d2 if d2 is not None else torch.cat(d2_list)


def _finish(
    acc: _Accumulator, d1: Tensor, d2: Tensor, norm: bool, by_layer: bool, symmetric: bool
) -> Tensor | dict[str, Tensor]:
    """The accumulated kernel, cosine-normalized on request (exact unit diagonal when symmetric)."""
    if by_layer:
        return acc.outs
    K = acc.outs[""]
    if norm:
        cosine_normalize(K, d1, d2)
        if symmetric:
            idx = torch.arange(K.shape[0])
            if acc.full:
                for c in range(K.shape[2]):
                    K[idx, idx, c, c] = torch.where(d1[:, c] > 0, 1.0, K[idx, idx, c, c])
            else:
                K[idx, idx] = torch.where(d1 > 0, torch.ones_like(d1), K[idx, idx])
    return K


def _assemble(
    eng: _Engine,
    src1: Source,
    src2: Source | None,
    spec: KindSpec,
    norm: bool,
    by_layer: bool,
) -> Tensor | dict[str, Tensor]:
    if src2 is None:
        acc, d, _ = _symmetric(eng, src1, spec.full, by_layer)
        return _finish(acc, d, d, norm, by_layer, True)
    acc, d1, d2 = _cross(eng, src1, src2, spec.full, by_layer)
    return _finish(acc, d1, d2, norm, by_layer, False)


def features(
    model: nn.Module,
    inputs: Any,
    *,
    kind: str = "trntk",
    normalize: bool | None = None,
    parameters: ParameterSpec = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    labels: LabelSpec = None,
    probes: int | Tensor | None = None,
    probe_seed: int = 0,
    modules: Sequence[str | nn.Module] | None = None,
    projection: Projection | None = None,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    implementation: str = "auto",
) -> Tensor:
    """Per-example feature vectors whose inner products give ``kernel(..., kind=kind)``.

    * trace kinds (``"trntk"``, ``"trntk0"``, sketched probes): vec J(x) = [g_1(x), ..., g_C(x)], shape
      (N, M·P), probe-major, parameters in ``named_parameters`` order;
    * ``"entk"``: J(x), shape (N, C, P);
    * ``"pntk"``: Σ_c g_c(x)/√C, shape (N, P); ``"gradcos"``: ∇_θ L(x, y), shape (N, P);
    * ``"margin"``: ∇_θ m(x, y) of the margin m = f_y − logsumexp_{c≠y} f_c (±f for one logit), (N, P);
    * ``"em"``, ``"ck"``: the concatenated flattened activations.

    ``normalize`` (default: the kind's) scales each row to unit norm, so that inner products of normalized
    features are the normalized kernel. Cost: as :func:`kernel`'s capture plus materializing N·M·P floats
    (use :func:`iter_features` to stream blocks instead of holding them).

    With ``projection`` (a :class:`tangentlens.sketch.Projection` R, K×P) each per-probe gradient is
    projected, φ_m(x) = R g_m(x) (the same R for every class), giving (N, M·K) (or (N, C, K) for ``"entk"``).
    Dense, sparse and SRHT projections act on per-parameter slices of the gradient at their global column
    offsets (parameters in ``named_parameters`` order), so the result equals projecting the concatenated
    gradient; ``kind="kronecker"`` projects Linear/Conv layers from their factors, (P_out δ)(P_in a)ᵀ summed
    over positions, never forming per-example gradients, and every other parameter with its flat fallback.

    ``memory_budget`` (bytes; default a quarter of the memory available) bounds one block's working set,
    materialized per-example gradients included: blocks are split within ``batch_size`` to fit it.
    """
    spec, norm, src, pred = _feature_setup(
        kind, inputs, batch_size, normalize, device, parameters, probes, probe_seed, labels, modules,
        projection, implementation,
    )
    out: Tensor | None = None
    for start, b in _feature_blocks(
        model, src, spec, norm, pred, parameters, device, dtype, probes, probe_seed, modules, projection,
        memory_budget, implementation,
    ):
        if out is None:  # one allocation of the result; blocks are copied in as they stream
            shape = (len(src), *b.shape[1:])
            check_memory(
                math.prod(shape) * b.element_size(), b.device, f"the {tuple(shape)} features result",
                "stream the rows with tl.iter_features(...) instead, pass fewer examples, or project the "
                "features to fewer dimensions (projection=Projection(K) with a smaller K)",
            )
            out = b.new_empty(shape)
        out[start : start + b.shape[0]] = b
    assert out is not None
    return out


def iter_features(
    model: nn.Module,
    inputs: Any,
    *,
    kind: str = "trntk",
    normalize: bool | None = None,
    parameters: ParameterSpec = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    labels: LabelSpec = None,
    probes: int | Tensor | None = None,
    probe_seed: int = 0,
    modules: Sequence[str | nn.Module] | None = None,
    projection: Projection | None = None,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    implementation: str = "auto",
) -> Iterator[tuple[int, Tensor]]:
    """Stream :func:`features` as ``(start_row, block)`` pairs (blocks on the CPU).

    The arguments (kind, options, device, parameter selection) are checked at the call; the model runs as
    the blocks are consumed. The caller's model is left untouched between blocks: its train/eval modes,
    ``requires_grad`` flags and forward hooks are set up for each block's capture and restored before
    the block is handed out, so a paused generator, or one that is never exhausted, leaves nothing
    installed on the model. (A ``dtype``/``device`` differing from the model's works on one private
    copy, made when the first block is read.)

    Raises:
        UnknownKindError, InputError, DeviceError, ParameterSelectionError (at the call);
        ModelCallError, ModelOutputError, NonFiniteError (while the blocks are read).
    """
    spec, norm, src, pred = _feature_setup(
        kind, inputs, batch_size, normalize, device, parameters, probes, probe_seed, labels, modules,
        projection, implementation,
    )
    check_materialized(model)
    if spec.probes != "none":
        select_parameters(model, parameters)  # a bad (or all-frozen) selection fails here, not at next()
    return _feature_blocks(
        model, src, spec, norm, pred, parameters, device, dtype, probes, probe_seed, modules, projection,
        memory_budget, implementation,
    )


def _feature_setup(
    kind: str,
    inputs: Any,
    batch_size: int,
    normalize: bool | None,
    device: torch.device | str | None,
    parameters: ParameterSpec,
    probes: int | Tensor | None,
    probe_seed: int,
    labels: LabelSpec,
    modules: Sequence[str | nn.Module] | None,
    projection: Projection | None,
    implementation: str = "auto",
) -> tuple[KindSpec, bool, Source, bool]:
    """Validate :func:`features`' arguments; return (spec, normalize, source, predicted labels)."""
    spec, norm = _validate_common(
        kind, batch_size, normalize, device, parameters=parameters, projection=projection, probes=probes,
        probe_seed=probe_seed, labels=labels, modules=modules, implementation=implementation,
    )
    lab, pred = labels_mode(labels)
    return spec, norm, Source(inputs, batch_size, lab, "inputs"), pred


def _feature_blocks(
    model: nn.Module,
    src: Source,
    spec: KindSpec,
    norm: bool,
    pred: bool,
    parameters: ParameterSpec,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    probes: int | Tensor | None,
    probe_seed: int,
    modules: Sequence[str | nn.Module] | None,
    projection: Projection | None,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    implementation: str = "auto",
) -> Iterator[tuple[int, Tensor]]:
    """The feature blocks of ``src`` in order: one capture per block (split to the size the memory budget
    allows), materialized or projected.

    One engine serves every block (its first-block checks and fallback decisions persist), but it is
    attached to the model only while a block is captured: eval mode, ``requires_grad`` flags and hooks
    are restored/removed before each ``yield``, so nothing is left on the caller's model while the
    consumer holds a block or abandons the generator.
    """
    work, dev, dt = place(model, device=device, dtype=dtype)
    sel = select_parameters(model, parameters) if spec.probes != "none" else {}
    wparams = dict(work.named_parameters())
    trainable = [wparams[n] for n in sel]
    sizes = {n: wparams[n].numel() for n in sel}
    eng: _Engine | None = None
    hooks = HookStash(work)
    if projection is None:
        materialize = "all"
    else:
        materialize = "kronecker" if projection.kind == "kronecker" else "all"
    try:
        for blk in src.blocks():
            subs: Iterator[Block] = iter([blk])
            while (sub := next(subs, None)) is not None:
                with eval_mode(model, work), requiring_grad(trainable):
                    if eng is None:
                        hooks.mark()
                    else:
                        hooks.restore()
                    try:
                        if eng is None:
                            eng = _Engine(
                                work, spec, parameters=list(sel) if sel else None, device=dev, dtype=dt,
                                probes=probes, probe_seed=probe_seed, predicted=pred, modules=modules,
                                budget=resolve_budget(memory_budget, None, dev), limit=src.batch_size,
                                materialize=materialize, implementation=implementation,
                            )
                        if eng.block is None:
                            eng._plan(blk)
                        assert eng.block is not None
                        if sub is blk and blk.size > eng.block:  # split to the planned size
                            subs = blk.split(eng.block)
                            sub = next(subs)
                        cap = eng.capture(sub.x, sub.y)
                        if projection is None:
                            feats = _block_features(cap, list(sel), spec, norm)
                        else:
                            feats = _block_projected(cap, sizes, spec, norm, projection)
                        del cap
                    finally:
                        hooks.stash()
                yield sub.start, feats
    finally:
        if eng is not None:
            eng.close()  # its hooks are stashed already; removing them again is a no-op


def _block_features(cap: BlockCapture, order: list[str], spec: KindSpec, norm: bool) -> Tensor:
    mats: dict[str, Tensor] = {}
    for c in cap.caps:
        mats.update(c.materialize())
    keys = order if order else list(mats)
    return _rows(torch.cat([mats[k] for k in keys], dim=2), spec, norm)  # (B, M, P)


def _rows(G: Tensor, spec: KindSpec, norm: bool) -> Tensor:
    """Per-example feature rows from (B, M, D) per-probe features: (B, M, D) for the full kind, else
    (B, M·D); optionally scaled to unit norm (per probe for the full kind)."""
    if not spec.full:
        G = G.reshape(G.shape[0], -1)
    if norm:
        G = G / G.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)
    return G.cpu()


def _block_projected(
    cap: BlockCapture, sizes: dict[str, int], spec: KindSpec, norm: bool, proj: Projection
) -> Tensor:
    """Projected features of one block: (B, M·K) (or (B, M, K) for the full kind)."""
    offsets: dict[str, int] = {}
    total = 0
    for n, k in sizes.items():
        offsets[n] = total
        total += k
    B, M = cap.size, _probes_of(cap)
    flat: Tensor | None = None
    kron: list[Tensor] = []
    slices: dict[str, Tensor] = {}
    for c in cap.caps:
        if proj.kind == "kronecker" and isinstance(c, OuterCap) and c.weight is not None:
            d_out, d_in = c.delta.shape[3], c.a.shape[2]
            f = proj.project_kronecker(c.a, c.delta, c.weight, d_in=d_in, d_out=d_out, total_dim=total)
            if proj.fold:
                flat = f.reshape(B * M, -1) if flat is None else flat + f.reshape(B * M, -1)
            else:
                kron.append(f)
            if c.bias is not None:
                slices[c.bias] = c.delta.sum(2)
        else:
            slices.update(c.materialize())
    # project maximal runs of adjacent parameters in one call each (fewer, larger GEMMs / tiles)
    run: list[Tensor] = []
    run_start = 0
    names = [n for n in sizes if n in slices]
    for i, n in enumerate(names):
        if not run:
            run_start = offsets[n]
        run.append(slices[n].reshape(B * M, -1))
        nxt = names[i + 1] if i + 1 < len(names) else None
        if nxt is None or offsets[nxt] != offsets[n] + sizes[n]:
            g = run[0] if len(run) == 1 else torch.cat(run, 1)
            pr = proj.project(g, run_start, total)
            flat = pr if flat is None else flat + pr
            run = []
    parts = kron + ([flat.reshape(B, M, -1)] if flat is not None else [])
    return _rows(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2), spec, norm)


def _probes_of(cap: BlockCapture) -> int:
    c = cap.caps[0]
    if isinstance(c, DenseCap):
        return next(iter(c.grads.values())).shape[1]
    return c.delta.shape[1]


def _projected_kernel(
    model: nn.Module,
    inputs: Any,
    other: Any,
    *,
    spec: KindSpec,
    norm: bool,
    projection: Projection,
    by_layer: bool,
    **kw: Any,
) -> Tensor:
    """Kernel of projected features: Φ1 Φ2ᵀ, cosine-normalized on request (proj-trNTK, proj-pNTK)."""
    if by_layer:
        raise InputError("by_layer=True is not available with a projection (features mix the layers).")
    other_labels = kw.pop("other_labels")
    F1 = features(model, inputs, kind=spec.name, normalize=False, projection=projection, **kw)
    if other is None:
        return _feature_kernel(F1, None, spec, norm)
    kw["labels"] = other_labels
    F2 = features(model, other, kind=spec.name, normalize=False, projection=projection, **kw)
    return _feature_kernel(F1, F2, spec, norm)


def _feature_kernel(F1: Tensor, F2: Tensor | None, spec: KindSpec, norm: bool) -> Tensor:
    """Φ1 Φ2ᵀ (Φ1 Φ1ᵀ if ``F2`` is None, with an exact unit diagonal), cosine-normalized on request."""
    sym = F2 is None
    F2 = F1 if F2 is None else F2
    if spec.full:
        K = torch.einsum("imk,jnk->ijmn", F1, F2)
        if norm:
            cosine_normalize(K, (F1 * F1).sum(-1), (F2 * F2).sum(-1))
        return K
    K = F1 @ F2.T
    if not torch.isfinite(K).all():
        raise NonFiniteError("NaN or infinite projected kernel values.")
    if norm:
        d1 = (F1 * F1).sum(1)
        d2 = d1 if sym else (F2 * F2).sum(1)
        cosine_normalize(K, d1, d2)
        if sym:
            K.diagonal().copy_(torch.where(d1 > 0, torch.ones_like(d1), K.diagonal()))
    return K


def available_kinds() -> list[str]:
    """Names of the kernel kinds."""
    from .kinds import KINDS

    return sorted(KINDS)


__all__ = ["kernel", "train_test_kernels", "features", "iter_features", "available_kinds"]
