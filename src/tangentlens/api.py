"""The functional core: ``kernel``, ``train_test_kernels``, ``compute``, ``features``, ``iter_features``.

Thin wrappers: each resolves its :class:`~tangentlens.KernelConfig` (``config=`` with keyword overrides),
checks the label arguments, and hands the data to the engine (:mod:`tangentlens.engine`: blocks, captures,
Gram passes) or the featurizer (:mod:`tangentlens.features`); normalization is
:mod:`tangentlens.blocks`'. The data stream in blocks: only the (N1, N2) result — never N·C·P floats — is
held whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypedDict, Unpack

import torch
from torch import Tensor, nn

from .blocks import KernelBlocks, cosine_normalize
from .config import KernelConfig
from .engine import Accumulator, cross_pass, open_engine, symmetric_pass
from .errors import InputError
from .features import Featurizer, feature_gram, feature_kernel, feature_sqnorms
from .inputs import Source
from .kinds import KINDS, check_options
from .network import ParameterSpec, resolve_device, select_parameters
from .probes import LabelSpec, check_label_modes, labels_mode
from .projection import Projection


class KernelOptions(TypedDict, total=False):
    """The keyword options of the kernel functions: :class:`~tangentlens.KernelConfig`'s fields (modules and
    parameters may be given as objects of the model; they are recorded by name)."""

    kind: str
    normalize: bool | None
    parameters: ParameterSpec
    probes: int | Tensor | None
    probe_seed: int
    modules: Sequence[str | nn.Module] | None
    projection: Projection | None
    implementation: str
    dtype: torch.dtype | str | None
    batch_size: int
    device: torch.device | str | None
    memory_budget: int | None
    cache_bytes: int | None


def _config(model: nn.Module, config: KernelConfig | None, options: dict[str, Any]) -> KernelConfig:
    """The call's config: ``config`` with ``options`` overriding it; model objects in ``parameters`` and
    ``modules`` become names. Raises DeviceError early for an unusable device."""
    opts = dict(options)
    sel = opts.get("parameters")
    if sel is not None and not isinstance(sel, str) and not (
        isinstance(sel, Sequence) and all(isinstance(s, str) for s in sel)
    ):
        opts["parameters"] = tuple(select_parameters(model, sel))
    mods = opts.get("modules")
    if mods is not None:
        opts["modules"] = _module_names(model, mods)
    if isinstance(opts.get("device"), (torch.device, int)):
        opts["device"] = str(torch.device(opts["device"]))
    cfg = KernelConfig.resolve(config, **opts)
    resolve_device(cfg.device)
    return cfg


def _module_names(model: nn.Module, modules: Any) -> tuple[str, ...]:
    by_obj = {id(m): n for n, m in model.named_modules()}
    items = [modules] if isinstance(modules, (str, nn.Module)) else list(modules)
    out = []
    for m in items:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, nn.Module) and id(m) in by_obj:
            out.append(by_obj[id(m)])
        else:
            raise InputError("modules= must list module names or modules of the model.")
    return tuple(out)


def kernel(
    model: nn.Module,
    inputs: Any,
    other: Any = None,
    *,
    labels: LabelSpec = None,
    other_labels: LabelSpec = None,
    by_layer: bool = False,
    config: KernelConfig | None = None,
    **options: Unpack[KernelOptions],
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
    ``kernel(model, x, x)`` (the same object twice, same labels) is computed as the symmetric ``kernel(model,
    x)``.

    Args:
        model: a network returning logits (B, C) (tensor, tuple, or object with ``.logits``). It is used in
            eval mode (BatchNorm running statistics, dropout off); every submodule's mode is restored.
        inputs: tensor (N, ...), dict of tensors, (inputs, labels) pair, Dataset or non-shuffling DataLoader.
        other: second data set (columns); ``None`` means ``inputs`` × ``inputs``.
        labels, other_labels: labels for ``gradcos`` and ``margin`` (or ``"predicted"``).
        by_layer: return ``{layer group: unnormalized kernel}`` whose sum is the unnormalized kernel.
        config: a :class:`~tangentlens.KernelConfig`; the keyword options override its fields.
        **options: the config's fields as keywords:

            * ``kind``: one of the kinds above (default ``"trntk"``).
            * ``normalize``: block-aware cosine normalization; ``None`` takes the kind's default.
            * ``parameters``: parameter subset (names, module names, modules or parameters); default all
              trainable.
            * ``batch_size``: examples per block (default 256); memory is bounded by blocks.
            * ``device``: compute device (default: the model's). The result is returned on the CPU.
            * ``dtype``: compute dtype (default: the model's; ``torch.float64`` for exactness). A differing
              device or dtype works on a copy of the model.
            * ``probes``: sketched trace over outputs: m Rademacher probes (unbiased for trNTK⁰) or an (M, C)
              tensor; ``probe_seed``: their seed.
            * ``modules``: modules for ``"em"``.
            * ``projection``: a :class:`tangentlens.Projection` R (K×P): the kernel of projected features
              φ_c(x) = R g_c(x), one R shared by every class and normalized *after* summing over classes —
              ``kind="trntk"`` gives proj-trNTK, ``kind="pntk", normalize=True`` proj-pNTK.
            * ``implementation``: "auto" (default; layer rules — factored Linear/Conv/Embedding/norm
              gradients, checked on the first block — and the ``torch.func`` fallback for every other
              parameter), "hooks" (layer rules only; a parameter needing the fallback is an
              UnsupportedLayerError) or "functional" (every parameter through ``torch.func`` per-example
              vector-Jacobian products: slower, independent of the rules; the tests cross-check the two).
            * ``memory_budget``: bytes the call may use beyond its inputs, model and result; None
              (default): a quarter of the memory available at the call on ``device`` (at least 512 MiB).
              Half bounds the cached captures, half one block's working set; blocks are split (within
              ``batch_size``) and layers kept factored to fit, said once by a
              :class:`~tangentlens.errors.MemoryBudgetWarning`.
            * ``cache_bytes``: keep the captures of ``other`` (or of ``inputs`` for a symmetric kernel) in
              memory up to this many bytes, else recompute them per block; None: half of the budget.

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
        does not fit), an unknown option, and an option the kind does not use (e.g. ``modules=`` with
        ``kind="trntk"``).
    """
    cfg = _config(model, config, options)
    spec = cfg.spec
    check_options(spec, labels=labels, other_labels=other_labels)
    if other is inputs and (other_labels is labels or (isinstance(labels, str) and other_labels == labels)):
        other, other_labels = None, None  # K(x, x): the symmetric case (upper triangle, one capture pass)
    lab1, pred1 = labels_mode(labels)
    lab2, pred2 = labels_mode(other_labels)
    src1 = Source(inputs, cfg.batch_size, lab1, "inputs")
    if spec.needs_labels and other is not None:
        check_label_modes(src1, pred1, pred2, ("labels", "other_labels"), warn=spec.leaks_labels)
    if cfg.projection is not None:
        F1, F2 = _projected(model, cfg, by_layer, (inputs, labels), (other, other_labels))
        return feature_kernel(F1, F2, spec.full, cfg.normalized)
    src2 = Source(other, cfg.batch_size, lab2, "other") if other is not None else None
    with open_engine(model, cfg, pred1 or (pred2 and src2 is not None)) as eng:
        if src2 is None:
            acc, d1, _ = symmetric_pass(eng, src1, spec.full, by_layer)
            return _finish(acc, d1, d1, cfg.normalized, by_layer, symmetric=True)
        acc, d1, d2 = cross_pass(eng, src1, src2, spec.full, by_layer)
        return _finish(acc, d1, d2, cfg.normalized, by_layer, symmetric=False)


def _projected(
    model: nn.Module, cfg: KernelConfig, by_layer: bool, *sides: tuple[Any, LabelSpec]
) -> list[Tensor | None]:
    """Unnormalized projected features of each ``(data, labels)`` side (None for absent data)."""
    if by_layer:
        raise InputError("by_layer=True is not available with a projection (features mix the layers).")
    raw = cfg.replace(normalize=False)
    return [None if x is None else features(model, x, labels=y, config=raw) for x, y in sides]


def _finish(
    acc: Accumulator, d1: Tensor, d2: Tensor, norm: bool, by_layer: bool, symmetric: bool
) -> Tensor | dict[str, Tensor]:
    """The accumulated kernel (or its layer groups), cosine-normalized in place on request."""
    K = acc.result(by_layer)
    if norm and isinstance(K, Tensor):
        cosine_normalize(K, d1, d2, unit_diagonal=symmetric)
    return K


def compute(
    model: nn.Module,
    train: Any,
    test: Any = None,
    *,
    labels: LabelSpec = None,
    test_labels: LabelSpec = None,
    config: KernelConfig | None = None,
    **options: Unpack[KernelOptions],
) -> KernelBlocks:
    """The unnormalized kernel blocks of a training set (and test points) with their diagonals.

    One pass: every training example is captured once and serves both blocks (while the captures fit the
    cache), the test × test block is never formed. The result's :meth:`~tangentlens.KernelBlocks.normalized`
    and :meth:`~tangentlens.KernelBlocks.scaled` forms need no recomputation, so trNTK and trNTK⁰ (or the
    scaled trNTK⁰ of the reference) come from one call with ``kind="trntk0"``.

    Args:
        model: the network, as in :func:`kernel`.
        train: the training examples (rows and columns of the train block, columns of the test block).
        test: the examples to explain (rows of the test block), or ``None``.
        labels, test_labels: labels of ``train`` and ``test`` for ``"gradcos"`` and ``"margin"``, as in
            :func:`train_test_kernels`.
        config: a :class:`~tangentlens.KernelConfig`; the keyword options override its fields.
        **options: the config's fields as keywords (see :func:`kernel`). ``normalize`` is recorded in the
            config and applied by :meth:`~tangentlens.KernelBlocks.kernels`; the blocks are always raw.

    Returns:
        :class:`~tangentlens.KernelBlocks` (form ``"raw"``).

    Cost and Raises: as :func:`train_test_kernels`.
    """
    cfg = _config(model, config, options)
    return _blocks(model, cfg, train, test, labels, test_labels)


def _blocks(
    model: nn.Module, cfg: KernelConfig, train: Any, test: Any, labels: LabelSpec, test_labels: LabelSpec,
    by_layer: bool = False,
) -> KernelBlocks:
    spec = cfg.spec
    check_options(spec, labels=labels, test_labels=test_labels)
    lab_tr, pred_tr = labels_mode(labels)
    lab_te, pred_te = labels_mode(test_labels)
    src_te = None if test is None else Source(test, cfg.batch_size, lab_te, "test")
    if spec.needs_labels and src_te is not None:
        check_label_modes(src_te, pred_te, pred_tr, ("test_labels", "labels"), warn=spec.leaks_labels)
    if cfg.projection is not None:
        F_tr, F_te = _projected(model, cfg, by_layer, (train, labels), (test, test_labels))
        assert F_tr is not None
        if F_te is None:
            return KernelBlocks(feature_gram(F_tr, None, spec.full), None, feature_sqnorms(F_tr), None, cfg)
        return KernelBlocks(feature_gram(F_tr, None, spec.full), feature_gram(F_te, F_tr, spec.full),
                            feature_sqnorms(F_tr), feature_sqnorms(F_te), cfg)
    src_tr = Source(train, cfg.batch_size, lab_tr, "train")
    with open_engine(model, cfg, pred_tr) as eng:
        acc, d_tr, caps = symmetric_pass(eng, src_tr, spec.full, by_layer, keep=src_te is not None)
        K_te = d_te = None
        if src_te is not None:
            acc_te, d_te, _ = cross_pass(eng, src_te, src_tr, spec.full, by_layer, caps2=caps, d2=d_tr)
            K_te = acc_te.result(by_layer)
    return KernelBlocks(acc.result(by_layer), K_te, d_tr, d_te, cfg)  # type: ignore[arg-type]


def train_test_kernels(
    model: nn.Module,
    train: Any,
    test: Any,
    *,
    labels: LabelSpec = None,
    test_labels: LabelSpec = None,
    by_layer: bool = False,
    config: KernelConfig | None = None,
    **options: Unpack[KernelOptions],
) -> tuple[Tensor, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The two blocks a kernel surrogate needs, K(train, train) and K(test, train), in one pass.

    Equal to ``kernel(model, train, labels=labels, ...)`` and
    ``kernel(model, test, train, labels=test_labels, other_labels=labels, ...)`` (same options otherwise),
    but every training example's gradients are captured once and serve both blocks (when the captures fit
    ``cache_bytes``), and the training diagonal of the symmetric block also normalizes the cross block. The
    test × test block is never formed. (:func:`compute` returns the same blocks unnormalized, with their
    diagonals.)

    Args:
        model, by_layer, config, **options: as in :func:`kernel`.
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
    cfg = _config(model, config, options)
    b = _blocks(model, cfg, train, test, labels, test_labels, by_layer)
    assert b.test is not None and b.test_diag is not None
    if cfg.normalized and not by_layer:  # in place: the raw blocks are this call's own
        cosine_normalize(b.train, b.train_diag, b.train_diag, unit_diagonal=True)
        cosine_normalize(b.test, b.test_diag, b.train_diag)
    return b.train, b.test


def features(
    model: nn.Module,
    inputs: Any,
    *,
    labels: LabelSpec = None,
    config: KernelConfig | None = None,
    **options: Unpack[KernelOptions],
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

    With ``projection`` (a :class:`tangentlens.Projection` R, K×P) each per-probe gradient is projected,
    φ_m(x) = R g_m(x) (the same R for every class), giving (N, M·K) (or (N, C, K) for ``"entk"``). Dense,
    sparse and SRHT projections act on per-parameter slices of the gradient at their global column offsets
    (parameters in ``named_parameters`` order), so the result equals projecting the concatenated gradient;
    ``kind="kronecker"`` projects Linear/Conv layers from their factors, (P_out δ)(P_in a)ᵀ summed over
    positions, never forming per-example gradients, and every other parameter with its flat fallback.

    ``memory_budget`` (bytes; default a quarter of the memory available) bounds one block's working set,
    materialized per-example gradients included: blocks are split within ``batch_size`` to fit it.

    Args:
        model, labels, config, **options: as in :func:`kernel` (``labels`` for the label kinds).
    """
    cfg = _config(model, config, options)
    check_options(cfg.spec, labels=labels)
    lab, pred = labels_mode(labels)
    src = Source(inputs, cfg.batch_size, lab, "inputs")
    with Featurizer(model, cfg, predicted=pred) as f:  # one result, every block written in place
        return f.features(src)


def iter_features(
    model: nn.Module,
    inputs: Any,
    *,
    labels: LabelSpec = None,
    config: KernelConfig | None = None,
    **options: Unpack[KernelOptions],
) -> Iterator[tuple[int, Tensor]]:
    """Stream :func:`features` as ``(start_row, block)`` pairs (blocks on the CPU).

    The arguments (kind, options, device, parameter selection) are checked at the call; the model runs as
    the blocks are consumed. The caller's model is left untouched between blocks: its train/eval modes,
    ``requires_grad`` flags and forward hooks are set up for each block's capture and restored before
    the block is handed out, so a paused generator, or one that is never exhausted, leaves nothing
    installed on the model. (A ``dtype``/``device`` differing from the model's works on one private
    copy, made when the first block is read.) :class:`~tangentlens.Featurizer` is the same as an object.

    Raises:
        UnknownKindError, InputError, DeviceError, ParameterSelectionError (at the call);
        ModelCallError, ModelOutputError, NonFiniteError (while the blocks are read).
    """
    cfg = _config(model, config, options)
    check_options(cfg.spec, labels=labels)
    lab, pred = labels_mode(labels)
    src = Source(inputs, cfg.batch_size, lab, "inputs")
    return _stream(Featurizer(model, cfg, predicted=pred), src)


def _stream(f: Featurizer, src: Source) -> Iterator[tuple[int, Tensor]]:
    with f:
        yield from f.blocks(src)


def available_kinds() -> list[str]:
    """Names of the kernel kinds."""
    return sorted(KINDS)


__all__ = [
    "kernel", "train_test_kernels", "compute", "features", "iter_features", "available_kinds",
    "KernelOptions",
]
