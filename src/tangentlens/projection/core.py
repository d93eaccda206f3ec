"""The :class:`Projection` facade: options, serialization, the public calls, one backend per kind.

A projection maps a parameter-space vector ``x in R^P`` to ``phi(x) = R x in R^K``. Every kind is a
random linear map with ``E[R^T R] = I`` in the default ``scale="unbiased"``, so ``E<phi(a), phi(b)> =
<a, b>`` and an unnormalized projected kernel is an unbiased estimate of the exact one.
``scale="reference"`` is the convention of the method's code and of TRAK (+-1 entries, features divided
by ``sqrt(P)``, no ``1/sqrt(K)``): ``E<phi(a), phi(b)> = (K / P) <a, b>``. For every kind the reference
features are the unbiased features times ``sqrt(K / P)``; cosine normalization cancels the constant.

Partition independence. The engine captures gradients layer by layer and batch by batch, so
:meth:`Projection.project` receives a slice ``g`` of rows (examples, or (example, class) pairs) and a
range of columns ``[offset, offset + p)`` of the full ``P``-vector. ``R`` is a pure function of ``(kind,
seed, K)`` and of the *global* column index, generated on the fly from a counter-based hash
(:mod:`.hashing`), so

- summing :meth:`Projection.project` over any partition of the ``P`` columns gives the projection of the
  whole vector (up to floating-point summation order, ~1e-7 relative in float32), and
- splitting the rows into batches of any size gives bit-identical rows (matrix products on fewer than 16
  rows are zero-padded to 16 rows because the BLAS uses another kernel, with another summation order,
  for very small row counts).

The same seed gives the same matrix on CPU and CUDA. ``R`` is never held whole unless it fits in
``memory_budget_bytes``. Kinds (``K = dim``), one backend module each:

- ``"rademacher"``, ``"gaussian"`` (:mod:`.dense`): dense i.i.d. entries, ``2 n P K`` flops;
- ``"sjlt"`` (:mod:`.sjlt`): ``s`` nonzeros per column, ``O(n P s)``;
- ``"srht"`` (:mod:`.srht`): a subsampled Hadamard transform per column tile, ``2 n T (a + b)`` flops per
  tile of order ``T = a b``;
- ``"kronecker"`` (:mod:`.kronecker`): per layer ``(P_out delta)(P_in a)^T`` summed over positions, from
  the captured factors; other parameters through the flat ``fallback`` kind;
- ``"khatri_rao"`` (:mod:`.khatri_rao`, the default): per layer ``sum_t (A delta_t) * (B a_t)``, ``K``
  coordinates from the captured factors (``K T (d_in + M d_out)`` multiply-adds per example), summed with
  the ``fallback`` kind's part: the fast kind at scale (see :class:`Projection` for the rule).

Layers from their factors. :meth:`Projection.project_layer` (:meth:`Projection.project_layers` for several
layers of the same rows at once) projects a Linear/Conv layer's gradients
``sum_t delta_t a_t^T`` (and bias ``sum_t delta_t``) from the captured factors without forming them:
``"khatri_rao"`` always (its definition), the dense kinds where :meth:`Projection.takes_factors` finds it
cheaper (the same matrix as :meth:`Projection.project`: ``R_o a_t`` is shared by the ``M`` probes, so
proj-trNTK costs about what proj-pNTK does). ``"sjlt"`` and ``"srht"`` always take materialized gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, UnknownKindError
from ..memory import check_memory
from .base import Backend, FlatBackend, LayerFactors, Spec, layer_shapes
from .dense import GaussianBackend, RademacherBackend
from .hashing import GEN_VERSION, check_int
from .khatri_rao import KhatriRaoBackend
from .kronecker import KroneckerBackend
from .sjlt import SJLTBackend
from .srht import SRHTBackend

__all__ = ["Projection", "KINDS", "FLAT_KINDS", "SCALES"]

_FLAT: dict[str, type[FlatBackend]] = {
    "rademacher": RademacherBackend,
    "gaussian": GaussianBackend,
    "sjlt": SJLTBackend,
    "srht": SRHTBackend,
}
FLAT_KINDS: tuple[str, ...] = tuple(_FLAT)
KINDS: tuple[str, ...] = (*FLAT_KINDS, "kronecker", "khatri_rao")
SCALES: tuple[str, ...] = ("unbiased", "reference")
_OPTIONS = ("s", "tile", "kron_dim", "fold", "fallback")  # kind-specific keys of to_dict()
DEFAULT_KIND = "khatri_rao"  # what Projection(K) uses: the fastest kind at any N (see the class docstring)


def _backend(spec: Spec, label: str) -> Backend:
    """The backend object of ``spec.kind``; the factored kinds get their own fallback backend."""
    if spec.kind in _FLAT:
        return _FLAT[spec.kind](spec, label)
    part = f"{label}'s {spec.fallback!r} part (parameters without layer factors)"
    flat = _FLAT[spec.fallback](replace(spec, kind=spec.fallback, tile=None), part)
    if spec.kind == "khatri_rao":
        return KhatriRaoBackend(spec, label, flat)
    return KroneckerBackend(spec, label, flat)


class Projection:
    """A seeded random projection ``R in R^{K x P}`` of parameter-space vectors, ``K = dim``.

    Args:
        dim: Projection dimension ``K`` (> 0).
        kind: ``"khatri_rao"`` (the default, see "Which kind" below), ``"rademacher"`` (the method's
            reference R: pass it to reproduce the reference's features), ``"gaussian"``, ``"sjlt"``,
            ``"srht"`` or ``"kronecker"``.
        seed: Integer seed; the matrix is a pure function of ``(kind, seed, dim, s)`` and global
            column indices (for ``"kronecker"`` / ``"khatri_rao"`` layers: of the layer's key and sizes),
            identical across batch sizes, layer splits, processes and devices.
        scale: ``"unbiased"`` (``E<phi(a), phi(b)> = <a, b>``) or ``"reference"`` (the method's /
            TRAK's convention: +-1 entries, divided by ``sqrt(P)``, so
            ``E<phi(a), phi(b)> = (K/P) <a, b>``).
        s: Nonzeros per column of ``"sjlt"`` (1 <= s <= dim; default 2), also of a ``"kronecker"`` or
            ``"khatri_rao"`` projection's ``"sjlt"`` fallback (``fold`` always uses ``s=1``).
        memory_budget_bytes: Generated dense tiles / sparse structures are cached while their total
            size stays within this budget; beyond it they are regenerated on every call.
        dtype: Compute dtype; ``None`` uses the dtype of the input.
        tile: Column tile width. Dense kinds: a performance knob only (the matrix does not depend
            on it). ``"srht"``: the Hadamard order ``T`` (a power of two >= dim; part of the
            definition).
        kron_dim: ``"kronecker"``: target ``k_in * k_out`` per layer (default ``dim``).
        fold: ``"kronecker"``: if True, :meth:`project_kronecker` CountSketches the per-layer
            Kronecker features into ``dim`` coordinates (layer-keyed), so that features of all
            layers and of :meth:`project` can be summed into one ``K``-vector (the two-stage route).
        fallback: ``"kronecker"`` / ``"khatri_rao"``: the flat kind used by :meth:`project` for
            parameters without layer factors (``"kronecker"``: also biases; norm affines, embeddings, ...).

    Which kind (the default rule): ``"khatri_rao"`` at every ``N``. A projection pays where the exact kernel
    costs more or does not fit (``N`` beyond a few thousand: the exact kernel grows as ``N^2``, features
    as ``N``), and there the Khatri-Rao kind is the fastest for networks of Linear/Conv layers: ``K T (d_in +
    M d_out)`` multiply-adds per example and layer (or ``M d_out d_in (T + K)`` through the gradient,
    whichever is fewer) against ``K d_out (T d_in + M T)`` for a dense ``R`` through the factors and
    ``M K P`` on materialized gradients -- about ``d_out`` times fewer. Measured
    (``benchmarks/projection_speed.py``, proj-trNTK, ``K = 2,048``, one thread, ``N = 2,000``): the
    method's MLP 2,162 examples/s against 80 for ``"rademacher"``, 113 for ``"sjlt"`` and 292 for
    ``"kronecker"``, ``N = 20,000`` in 11.5 s against 41 s for the exact trNTK; a small CNN 163 against
    44, 85 and 131, ``N = 20,000`` in 143 s against ~1,370 s. Its price is fidelity: the variance of each
    inner product is 1 to 4 times a dense ``R``'s, the most for aligned inputs (mean |projected - exact
    cosine| 0.0071 against 0.0064 for ``"rademacher"`` on that MLP, 0.0081 against 0.0050 on the CNN), so
    a ``K`` 1.2 to 2.6 times larger buys the dense kind's accuracy, still at a fraction of its cost. Pass
    ``kind="rademacher"`` for the method's reference matrix. Parameters without layer factors (norm
    affines, embeddings, custom layers) go through the ``fallback`` (``"sjlt"``).

    Raises:
        InputError: ``dim`` or ``seed`` not a (non-bool) integer, ``dim <= 0``, bad ``s``/``tile``.
        UnknownKindError: unknown ``kind``, ``scale`` or ``fallback``.
    """

    def __init__(
        self,
        dim: int,
        kind: str = DEFAULT_KIND,
        seed: int = 0,
        scale: str = "unbiased",
        *,
        s: int = 2,
        memory_budget_bytes: int = 256 * 2**20,
        dtype: torch.dtype | None = None,
        tile: int | None = None,
        kron_dim: int | None = None,
        fold: bool = False,
        fallback: str = "sjlt",
    ) -> None:
        self.dim = check_int("dim (the projection dimension K)", dim, minimum=1)
        if not isinstance(kind, str) or kind not in KINDS:
            raise UnknownKindError(f"Unknown projection kind {kind!r}; choose one of {list(KINDS)}.")
        self.kind = kind
        self.seed = check_int("seed", seed)
        if not isinstance(scale, str) or scale not in SCALES:
            raise UnknownKindError(f"Unknown projection scale {scale!r}; choose one of {list(SCALES)}.")
        self.scale = scale
        self.s = check_int("s (nonzeros per column)", s, minimum=1)
        self.memory_budget_bytes = check_int("memory_budget_bytes", memory_budget_bytes, minimum=0)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputError(f"dtype must be a floating torch.dtype or None, got {dtype!r}.")
        self.dtype = dtype
        self.kron_dim = self.dim if kron_dim is None else check_int("kron_dim", kron_dim, minimum=1)
        self.fold = bool(fold)
        if fallback not in FLAT_KINDS:
            raise UnknownKindError(f"Unknown fallback kind {fallback!r}; choose one of {list(FLAT_KINDS)}.")
        self.fallback = fallback
        spec = Spec(kind, self.dim, self.seed, scale, self.s, self.memory_budget_bytes, dtype, tile,
                    self.kron_dim, self.fold, fallback)
        self._backend = _backend(spec, f"Projection(dim={self.dim:,}, kind={kind!r})")
        self.tile = self._backend.tile

    # ---------------------------------------------------------------- bookkeeping

    @property
    def uses_factors(self) -> bool:
        """True when Linear/Conv layers may be projected from their captured factors (``"kronecker"``
        through :meth:`project_kronecker`; ``"khatri_rao"`` and the dense kinds through
        :meth:`project_layer` where :meth:`takes_factors`), so a featurizer should keep them factored;
        False for ``"sjlt"`` and ``"srht"``, which take materialized per-example gradients."""
        return self._backend.uses_factors

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description; stored with every result so the convention is never lost."""
        d: dict[str, Any] = {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "scale": self.scale,
            "expectation": "<phi(a),phi(b)> ~ <a,b>"
            if self.scale == "unbiased"
            else "<phi(a),phi(b)> ~ (K/P) <a,b>",
            "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "generator": f"tangentlens-mix32-v{GEN_VERSION}",
        }
        d.update(self._backend.describe())
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Projection:
        """Rebuild a projection from :meth:`to_dict` output (same matrix)."""
        dtype = getattr(torch, d["dtype"]) if d.get("dtype") else None
        options = {k: d[k] for k in _OPTIONS if k in d}
        return cls(d["dim"], d["kind"], seed=d["seed"], scale=d["scale"], dtype=dtype, **options)

    def __repr__(self) -> str:
        return (
            f"Projection(dim={self.dim}, kind={self.kind!r}, seed={self.seed}, scale={self.scale!r}"
            f"{self._backend.repr_extra()})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Projection) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.to_dict().items())))

    @property
    def cache_bytes(self) -> int:
        """Bytes of generated tiles and structures held now (at most ``memory_budget_bytes``, per part
        for ``"kronecker"``: its layer factors and its fallback each have the budget)."""
        return self._backend.cache_bytes

    def cache_form(
        self, total_dim: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> str | None:
        """How a dense kind holds the tiles of its ``K x total_dim`` matrix on ``device`` in ``dtype``,
        decided on first use from the budget left: ``"full"`` (the compute dtype), ``"int8"`` or
        ``"bits"`` (Rademacher only: 1 byte or 1 bit per entry), or ``"none"`` (regenerated on every
        call). None for ``"sjlt"`` and ``"srht"``, which cache their structures while the budget
        lasts; ``"kronecker"`` answers for its fallback."""
        total_dim = check_int("total_dim", total_dim, minimum=1)
        return self._backend.cache_form(total_dim, torch.device(device), dtype)

    def clear_cache(self) -> None:
        """Drop every cached tile (frees memory; results do not change)."""
        self._backend.clear_cache()

    # ---------------------------------------------------------------- flattened projection

    def project(self, g: Tensor, offset: int = 0, total_dim: int | None = None) -> Tensor:
        """Project rows of a column slice: returns ``g @ R[:, offset:offset + p].T``, shape ``(n, K)``.

        Args:
            g: ``(n, p)`` rows (examples or (example, class) pairs) of flattened gradient entries
                that occupy columns ``[offset, offset + p)`` of a ``P = total_dim`` vector.
            offset: First global column of ``g``.
            total_dim: ``P``, the length of the full vector (default ``offset + p``). Only the
                ``"reference"`` scale (``1/sqrt(P)``) and error checks depend on it.

        Returns:
            ``(n, K)`` in the compute dtype. Summing the results over a partition of ``[0, P)``
            equals projecting the full vector; rows never depend on which other rows are in the
            batch. ``"kronecker"`` projects with its ``fallback`` kind.

        Cost: dense kinds ``2 n p K`` flops plus generating ``p K`` entries unless cached;
        ``"sjlt"`` ``O(n p s)``; ``"srht"`` ``2 n T (a + b)`` flops per touched tile (``T = a b``),
        ``K n`` memory.

        Raises:
            InputError: ``g`` not a 2-D floating tensor, or the column range is outside ``[0, P)``,
                or ``"srht"`` with ``K > P``.
            MemoryBudgetError: the call's working set exceeds the memory available.
        """
        if not isinstance(g, Tensor) or g.dim() != 2:
            raise InputError(
                f"project() expects a 2-D tensor (rows x columns), got "
                f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}; flatten per row."
            )
        if not g.dtype.is_floating_point:
            raise InputError(f"project() expects a floating tensor, got {g.dtype}.")
        p = g.shape[1]
        offset = check_int("offset", offset, minimum=0)
        total = offset + p if total_dim is None else check_int("total_dim", total_dim, minimum=1)
        if offset + p > total:
            raise InputError(
                f"columns [{offset}, {offset + p}) exceed total_dim={total}; pass the full length P."
            )
        return self._backend.project(g.to(self.dtype or g.dtype), offset, total)

    __call__ = project

    def matrix(self, total_dim: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
        """The explicit ``(K, P)`` matrix (for tests and small ``P`` only: ``K P`` floats).

        Raises:
            MemoryBudgetError: the ``P x P`` identity it projects and the result do not fit in memory.
        """
        total_dim = check_int("total_dim", total_dim, minimum=1)
        check_memory(
            (total_dim * total_dim + 2 * total_dim * self._backend.kpad) * dtype.itemsize, "cpu",
            f"Projection.matrix({total_dim:,})",
            "matrix() is for small P only; project the vectors with project() instead",
        )
        eye = torch.eye(total_dim, dtype=dtype)
        return self.project(eye, 0, total_dim).T.contiguous()

    # ---------------------------------------------------------------- layers from their factors

    def takes_factors(self, d_in: int, d_out: int, positions: int = 1, probes: int = 1) -> bool:
        """Whether :meth:`project_layer` projects a Linear/Conv layer of these sizes from its factors.

        ``"khatri_rao"``: always. Dense kinds: when ``T d_out (d_in + M)`` is under 0.8 times ``M d_out
        d_in`` (multiply-adds per example and coordinate), e.g. ``T = 1`` with ``M >= 2`` probes
        (proj-trNTK of an MLP). ``"sjlt"``, ``"srht"``, ``"kronecker"`` (see :meth:`project_kronecker`):
        never. Otherwise the caller materializes the gradient and calls :meth:`project`.

        Raises:
            InputError: a size not a positive integer.
        """
        d_in = check_int("d_in", d_in, minimum=1)
        d_out = check_int("d_out", d_out, minimum=1)
        positions = check_int("positions", positions, minimum=1)
        probes = check_int("probes", probes, minimum=1)
        if self.kind == "kronecker":
            return False
        return self._backend.takes_factors(d_in, d_out, positions, probes)

    def project_layer(
        self,
        a: Tensor,
        delta: Tensor,
        key: str,
        *,
        weight_offset: int | None,
        bias_offset: int | None = None,
        total_dim: int,
        out: Tensor | None = None,
    ) -> Tensor:
        """Project a Linear/Conv layer's per-example gradients from their factors, ``(n, M, K)``.

        The weight's gradient is ``G = sum_t delta_t a_t^T`` (row-major, ``d_out x d_in``: the flattened
        weight of a Linear layer, or of a convolution whose patches ``a_t`` are unfolded in the weight's
        ``(C_in, kh, kw)`` order) and the bias's ``sum_t delta_t``. Dense kinds return
        ``project(vec(G), weight_offset) + project(bias, bias_offset)`` (the same matrix, another
        summation order); ``"khatri_rao"`` returns ``sum_t (A delta_t) * (B [a_t; 1]) / sqrt(K)`` with
        ``A``, ``B`` seeded by ``(seed, key)`` (see :meth:`khatri_rao_factors`).

        Args:
            a: ``(n, T, d_in)`` input activations (or unfolded patches), or ``(n, d_in)``.
            delta: ``(n, M, T, d_out)`` output gradients per probe, or ``(n, M, d_out)``.
            key: The layer's identifier (its module's qualified name); seeds ``"khatri_rao"``'s factors.
            weight_offset: First global column of the weight (``None``: the weight is not selected).
            bias_offset: First global column of the bias (``None``: no bias, or not selected).
            total_dim: ``P``, the length of the whole parameter vector.
            out: ``(n, M, K)`` features to add this layer's to, in place (e.g. the sum over layers so far;
                equal to ``out + project_layer(...)`` up to rounding, with fewer passes over memory).

        Returns:
            ``out`` (or new features) in the compute dtype; rows never depend on the other rows of the call.

        Cost: ``"khatri_rao"`` ``K T (d_in + M d_out)`` multiply-adds per example (or ``M d_out d_in (T
        + K)`` through the gradient, whichever is fewer); dense ``K d_out T (d_in + M)``. Intermediates
        are bounded by steps of rows.

        Raises:
            InputError: not a factor-taking kind; shapes that do not match; no part selected; columns
                outside ``[0, P)``.
            MemoryBudgetError: the call's working set exceeds the memory available.
        """
        return self.project_layers(
            [LayerFactors(a, delta, key, weight_offset, bias_offset)], total_dim=total_dim, out=out)

    def project_layers(
        self, layers: Sequence[LayerFactors], *, total_dim: int, out: Tensor | None = None, add: bool = True
    ) -> Tensor:
        """The sum of :meth:`project_layer` over several layers of the same rows and probes, ``(n, M, K)``.

        Equal to calling :meth:`project_layer` layer after layer with ``out=`` (up to rounding), with fewer
        passes over memory: ``"khatri_rao"`` adds the one-position layers' parts chunk by chunk of rows,
        each chunk's ``(rows, M, K)`` features and per-probe products staying in the CPU caches across the
        layers (about ``CACHE_ELEMS`` entries), instead of streaming the whole ``(n, M, K)`` through memory
        once per layer. Rows never depend on the chunks or on the other rows of the call.

        Args:
            layers: :class:`~tangentlens.projection.base.LayerFactors` ``(a, delta, key, weight_offset,
                bias_offset)`` per layer, as the arguments of :meth:`project_layer`; every ``a`` with the same
                ``n`` rows and every ``delta`` with the same ``M`` probes.
            total_dim: ``P``, the length of the whole parameter vector.
            out: ``(n, M, K)`` features to add to, in place.
            add: False: write over ``out`` instead (its contents are ignored: no zero fill is needed).

        Returns:
            ``out`` (or new features) in the compute dtype.

        Cost: the sum of the layers' :meth:`project_layer` costs.

        Raises:
            InputError: as :meth:`project_layer`; no layers; layers of different rows or probes.
            MemoryBudgetError: the call's working set exceeds the memory available.
        """
        if not self._backend.uses_factors or self.kind == "kronecker":
            how = "use project_kronecker" if self.kind == "kronecker" else "materialize and use project()"
            raise InputError(
                f"project_layer needs kind='khatri_rao' or a dense kind; this projection is "
                f"kind={self.kind!r} ({how})."
            )
        total = check_int("total_dim", total_dim, minimum=1)
        checked = [self._checked_layer(lay, total) for lay in layers]
        if not checked:
            raise InputError("project_layers needs at least one layer.")
        n, m = checked[0].a.shape[0], checked[0].delta.shape[1]
        if any(c.a.shape[0] != n or c.delta.shape[1] != m for c in checked):
            raise InputError(
                "project_layers needs layers of the same rows and probes; got a/delta shapes "
                f"{[(tuple(c.a.shape), tuple(c.delta.shape)) for c in checked]}."
            )
        dt = self.dtype or checked[0].a.dtype
        shape = (n, m, self.dim)
        if out is not None and (not isinstance(out, Tensor) or tuple(out.shape) != shape or out.dtype != dt):
            raise InputError(
                f"out must be a {shape} {dt} tensor, got "
                f"{(tuple(out.shape), out.dtype) if isinstance(out, Tensor) else type(out).__name__}."
            )
        checked = [c._replace(a=c.a.to(dt), delta=c.delta.to(dt)) for c in checked]
        return self._backend.project_factor_layers(checked, total, out, bool(add))

    @staticmethod
    def _checked_layer(lay: LayerFactors, total: int) -> LayerFactors:
        """One layer's factors validated and shaped ``(n, T, d_in)`` / ``(n, M, T, d_out)``."""
        if not isinstance(lay, LayerFactors):
            lay = LayerFactors(*lay)
        a, delta = lay.a, lay.delta
        if not isinstance(a, Tensor) or not isinstance(delta, Tensor):
            raise InputError("project_layer expects the tensors a and delta.")
        if not (a.dtype.is_floating_point and delta.dtype.is_floating_point):
            raise InputError(f"project_layer expects floating tensors, got {a.dtype} and {delta.dtype}.")
        d_in, d_out = a.shape[-1], delta.shape[-1]
        a, delta = layer_shapes(a, delta, d_in, d_out)
        if lay.weight_offset is None and lay.bias_offset is None:
            raise InputError("project_layer needs weight_offset or bias_offset (the selected parts).")
        parts = (("weight", lay.weight_offset, d_out * d_in), ("bias", lay.bias_offset, d_out))
        for name, off, width in parts:
            if off is not None and check_int(f"{name}_offset", off, minimum=0) + width > total:
                raise InputError(
                    f"the {name}'s columns [{off}, {off + width}) exceed total_dim={total}; pass the full P."
                )
        return LayerFactors(a, delta, str(lay.key), lay.weight_offset, lay.bias_offset)

    def khatri_rao_factors(
        self, key: str, d_in: int, d_out: int, *, dtype: torch.dtype = torch.float64
    ) -> tuple[Tensor, Tensor]:
        """The explicit +-1 factors ``(A, B)`` of layer ``key``: ``(K, d_out)`` and ``(K, d_in + 1)`` (the
        last column of ``B`` is the bias's), so that :meth:`project_layer` returns ``sum_t (A delta_t) * (B[:,
        :d_in] a_t + B[:, d_in]) / sqrt(K)`` (times ``sqrt(K / P)`` for ``scale="reference"``). For tests.

        Raises:
            InputError: the projection is not ``kind="khatri_rao"``; a size not a positive integer.
        """
        if not isinstance(self._backend, KhatriRaoBackend):
            raise InputError(
                f"khatri_rao_factors needs kind='khatri_rao'; this projection is kind={self.kind!r}."
            )
        d_in = check_int("d_in", d_in, minimum=1)
        d_out = check_int("d_out", d_out, minimum=1)
        at, bt = self._backend.factors(str(key), d_in, d_out, torch.device("cpu"), dtype)
        return at[:, : self.dim].T.contiguous(), bt[:, : self.dim].T.contiguous()

    # ---------------------------------------------------------------- Kronecker projection

    def _kronecker(self) -> KroneckerBackend:
        if not isinstance(self._backend, KroneckerBackend):
            raise InputError(
                f"Kronecker sketches need kind='kronecker'; this projection is kind={self.kind!r}."
            )
        return self._backend

    def kronecker_dims(self, d_in: int, d_out: int) -> tuple[int, int]:
        """The ``(k_in, k_out)`` used for a layer with ``d_in`` inputs and ``d_out`` outputs.

        Allocation: the relative variance of a Kronecker sketch is about ``1/k_in + 1/k_out``,
        minimized at ``k_in = k_out = sqrt(kron_dim)`` under ``k_in k_out <= kron_dim``. Each side
        is capped at its dimension (a side with ``k = d`` uses the identity: exact, no variance),
        and the budget freed by a cap goes to the other side. So ``k_in k_out <= kron_dim`` and
        equals it when the layer allows.

        Raises:
            InputError: the projection is not ``kind="kronecker"``; a size not a positive integer.
        """
        return self._kronecker().kronecker_dims(d_in, d_out)

    def kronecker_factors(
        self,
        key: str | int,
        d_in: int,
        d_out: int,
        *,
        k_in: int | None = None,
        k_out: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> tuple[Tensor, Tensor]:
        """The explicit factors ``(P_in, P_out)`` of layer ``key``: ``(k_in, d_in)`` and ``(k_out, d_out)``
        with +-1/sqrt(k) entries (the identity for a side with ``k = d``), so that
        :meth:`project_kronecker` returns ``vec(G) @ (P_out (x) P_in)^T``. For tests and small layers.

        Raises:
            InputError: the projection is not ``kind="kronecker"``; a ``k`` outside ``[1, d]``.
        """
        kr = self._kronecker()
        ki, ko = kr.kronecker_dims(d_in, d_out)
        ki = ki if k_in is None else check_int("k_in", k_in, minimum=1)
        ko = ko if k_out is None else check_int("k_out", k_out, minimum=1)
        if ki > d_in or ko > d_out:
            raise InputError(f"k_in={ki} > d_in={d_in} or k_out={ko} > d_out={d_out}; use k <= d.")
        dev = torch.device(device)
        out = []
        for side, d, k in (("in", d_in, ki), ("out", d_out, ko)):
            pt = kr.factor(key, side, d, k, dev, dtype)
            out.append(torch.eye(d, dtype=dtype, device=dev) if pt is None else pt.T.contiguous())
        return out[0], out[1]

    def project_kronecker(
        self,
        a: Tensor,
        delta: Tensor,
        key: str | int,
        *,
        d_in: int,
        d_out: int,
        total_dim: int | None = None,
        k_in: int | None = None,
        k_out: int | None = None,
    ) -> Tensor:
        """Kronecker sketch of a layer whose per-example gradient is ``G = sum_t delta_t a_t^T``.

        Returns ``vec(sum_t (P_out delta_t)(P_in a_t)^T) = (P_out (x) P_in) vec(G)`` (row-major vec,
        index ``o * k_in + i``) without forming ``G``: ``P_in`` (``k_in x d_in``) and ``P_out``
        (``k_out x d_out``) have i.i.d. +-1/sqrt(k) entries seeded by ``(seed, key)``, so
        ``E[(P_out (x) P_in)^T (P_out (x) P_in)] = I`` (unbiased). With ``fold=True`` the result is
        then CountSketched (s = 1, keyed by the layer) into ``dim`` coordinates, still unbiased, so
        the features of all layers and of :meth:`project` can be summed.

        Args:
            a: ``(n, T, d_in)`` input activations (``T`` positions; unfold patches for
                convolutions), or ``(n, d_in)`` for ``T = 1``.
            delta: ``(n, M, T, d_out)`` output gradients per probe ``m``, or ``(n, M, d_out)``.
            key: Layer identifier (e.g. the module's qualified name); seeds ``P_in`` and ``P_out``.
            d_in, d_out: Layer sizes (checked against the tensors).
            total_dim: ``P`` of the whole parameter vector; required for ``scale="reference"``,
                which multiplies the unbiased features by ``sqrt(dim / P)`` (the convention
                ``E<phi(a), phi(b)> = (K/P) <a, b>`` with ``K = dim``, as for :meth:`project`).
            k_in, k_out: Override :meth:`kronecker_dims`.

        Returns:
            ``(n, M, k_out * k_in)``, or ``(n, M, dim)`` when ``fold=True``.

        Cost: ``2 n T (d_in k_in + M d_out k_out + M k_out k_in)`` flops; memory ``n M k_out k_in``.

        Raises:
            InputError: the projection is not ``kind="kronecker"``; shapes that do not match; a ``k``
                larger than its side; ``scale="reference"`` without ``total_dim``.
            MemoryBudgetError: the call's working set exceeds the memory available.
        """
        return self._kronecker().project_kronecker(a, delta, key, d_in, d_out, total_dim, k_in, k_out)
