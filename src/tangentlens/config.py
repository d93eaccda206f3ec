"""``KernelConfig``: what defines a kernel computation, validated once, serializable, comparable.

Every public kernel function (:func:`tangentlens.kernel`, :func:`tangentlens.train_test_kernels`,
:func:`tangentlens.compute`, :func:`tangentlens.features`, :func:`tangentlens.iter_features`) takes
``config=`` and the config's fields as keywords; keywords override the config's fields. The config's
:meth:`KernelConfig.to_dict` is plain JSON (the projection's own description included) and
:meth:`KernelConfig.fingerprint` hashes the fields that define the result — what a store compares on reopen.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .errors import InputError
from .kinds import IMPLEMENTATIONS, KINDS, KindSpec, check_options, kind_spec
from .projection import Projection

_DTYPES = {"float16", "bfloat16", "float32", "float64"}
# fields that do not change the result beyond floating-point rounding (execution settings); not fingerprinted
EXECUTION_FIELDS: frozenset[str] = frozenset({"batch_size", "device", "memory_budget", "cache_bytes"})


def _names(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    try:
        items = list(items)
    except TypeError:
        items = [items]
    if not items or not all(isinstance(v, str) for v in items):
        raise InputError(
            f"KernelConfig.{what} holds names (strings); got {value!r}. The kernel functions accept modules "
            f"and parameters for {what}= and turn them into names; a config built by hand takes the names."
        )
    return tuple(items)


def _probes(value: Any) -> int | tuple[tuple[float, ...], ...] | None:
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if int(value) < 1:
            raise InputError(f"probes must be a positive number of output probes; got {value!r}.")
        return int(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().tolist()
    try:
        rows = tuple(tuple(float(v) for v in row) for row in value)
    except (TypeError, ValueError):
        raise InputError(
            "probes must be a number of Rademacher probes or an (M, C) matrix of probe vectors; "
            f"got {value!r}."
        ) from None
    finite = all(math.isfinite(v) for r in rows for v in r)
    if not rows or len({len(r) for r in rows}) != 1 or not rows[0] or not finite:
        raise InputError("probes given as a matrix must be a non-empty (M, C) array of finite numbers.")
    return rows


def _optional_int(name: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "positive" if minimum > 0 else "non-negative"
        raise InputError(f"{name} must be a {what} number of bytes; got {value!r}.")
    return int(value)


@dataclass(frozen=True)
class KernelConfig:
    """The full description of a kernel computation, validated at construction.

    Attributes:
        kind: kernel kind (:func:`tangentlens.available_kinds`).
        normalize: block-aware cosine normalization; ``None``: the kind's default (:attr:`normalized`).
        parameters: names of the parameters (or modules) to differentiate; ``None``: every trainable one.
        probes: ``m`` Rademacher output probes (sketched trace), or an (M, C) matrix of probe vectors.
        probe_seed: seed of the Rademacher probes.
        modules: module names for ``kind="em"``.
        projection: a :class:`tangentlens.Projection` (proj-trNTK, proj-pNTK, projected features).
        implementation: ``"auto"``, ``"hooks"`` or ``"functional"`` (how per-example gradients are taken).
        dtype: compute dtype name (``"float32"``, ``"float64"``, ...); ``None``: the model's.
        batch_size: examples per block (execution).
        device: compute device (execution); ``None``: the model's.
        memory_budget: bytes the call may use (execution); ``None``: a quarter of the available memory.
        cache_bytes: bytes for cached captures (execution); ``None``: half of the memory budget.

    Raises:
        UnknownKindError: an unknown kind.
        InputError: a bad value, or an option the kind does not accept (the message names the kinds that
            accept it), e.g. ``modules=`` with ``kind="trntk"``.
    """

    kind: str = "trntk"
    normalize: bool | None = None
    parameters: tuple[str, ...] | None = None
    probes: int | tuple[tuple[float, ...], ...] | None = None
    probe_seed: int = 0
    modules: tuple[str, ...] | None = None
    projection: Projection | None = None
    implementation: str = "auto"
    dtype: str | None = None
    batch_size: int = 256
    device: str | None = None
    memory_budget: int | None = None
    cache_bytes: int | None = None

    def __post_init__(self) -> None:
        spec = kind_spec(self.kind)
        set_ = object.__setattr__
        set_(self, "kind", spec.name)
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise InputError(f"normalize must be True, False or None; got {self.normalize!r}.")
        set_(self, "parameters", _names(self.parameters, "parameters"))
        set_(self, "modules", _names(self.modules, "modules"))
        set_(self, "probes", _probes(self.probes))
        if isinstance(self.probe_seed, bool) or not isinstance(self.probe_seed, numbers.Integral):
            raise InputError(f"probe_seed must be an integer; got {self.probe_seed!r}.")
        if self.projection is not None and not isinstance(self.projection, Projection):
            raise InputError(
                f"projection must be a tangentlens.Projection; got {type(self.projection).__name__}."
            )
        if self.implementation not in IMPLEMENTATIONS:
            raise InputError(f"implementation must be one of {IMPLEMENTATIONS}; got {self.implementation!r}.")
        dt = self.dtype
        if isinstance(dt, torch.dtype):
            dt = str(dt).removeprefix("torch.")
        if dt is not None and dt not in _DTYPES:
            raise InputError(
                f"dtype must be one of {sorted(_DTYPES)} (or a torch dtype); got {self.dtype!r}.")
        set_(self, "dtype", dt)
        bs = self.batch_size
        if isinstance(bs, bool) or not isinstance(bs, numbers.Integral) or bs < 1:
            raise InputError(f"batch_size must be a positive integer; got {bs!r}.")
        set_(self, "batch_size", int(bs))
        if self.device is not None:
            if not isinstance(self.device, (str, int, torch.device)):
                raise InputError(f"device must be a device name, index or torch.device; got {self.device!r}.")
            set_(self, "device", str(torch.device(self.device)) if not isinstance(self.device, str)
                 else self.device)
        set_(self, "memory_budget", _optional_int("memory_budget", self.memory_budget, 1))
        set_(self, "cache_bytes", _optional_int("cache_bytes", self.cache_bytes, 0))
        check_options(
            spec, parameters=self.parameters, projection=self.projection, probes=self.probes,
            probe_seed=self.probe_seed, modules=self.modules, implementation=self.implementation,
        )

    # ----------------------------------------------------------------------------------------------
    @property
    def spec(self) -> KindSpec:
        """The kind's registry entry (what it differentiates, its defaults and options)."""
        return KINDS[self.kind]

    @property
    def normalized(self) -> bool:
        """Whether results are cosine-normalized: ``normalize``, or the kind's default when ``None``."""
        return self.spec.normalize if self.normalize is None else self.normalize

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The compute dtype as a ``torch.dtype`` (``None``: the model's)."""
        return None if self.dtype is None else getattr(torch, self.dtype)

    @property
    def probe_matrix(self) -> int | torch.Tensor | None:
        """``probes`` in the form the engine takes: an int, an (M, C) float64 tensor, or ``None``."""
        if isinstance(self.probes, tuple):
            return torch.tensor(self.probes, dtype=torch.float64)
        return self.probes

    def replace(self, **changes: Any) -> KernelConfig:
        """A copy with ``changes`` applied (validated again).

        Raises:
            InputError: an unknown field, or the changed config is invalid.
        """
        return type(self).resolve(self, **changes) if changes else self

    @classmethod
    def resolve(cls, config: KernelConfig | None, **given: Any) -> KernelConfig:
        """The config of a call: ``config`` (or the defaults) with the ``given`` keywords overriding its
        fields. A ``kind`` different from the config's drops the config's options that kind does not accept.

        Raises:
            InputError: ``config`` is not a KernelConfig, an unknown option, or the merged config is invalid.
        """
        names = [f.name for f in fields(cls)]
        unknown = set(given) - set(names)
        if unknown:
            raise InputError(
                f"Unknown option(s) {sorted(unknown)}; the options are KernelConfig's fields: {names}.")
        if config is None:
            return cls(**given)
        if not isinstance(config, KernelConfig):
            raise InputError(f"config must be a tangentlens.KernelConfig; got {type(config).__name__}.")
        if "kind" in given and given["kind"] != config.kind:
            # a new kind starts from that kind's options: keep only the options it accepts
            spec = kind_spec(given["kind"])
            base = {f.name: getattr(config, f.name) for f in fields(config)}
            for opt in ("parameters", "projection", "probes", "probe_seed", "modules", "implementation"):
                if opt not in spec.options and opt not in given:
                    base.pop(opt)
            base.update(given)
            return cls(**base)
        return replace(config, **given)

    # ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (the projection as its own ``to_dict()``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Projection):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = [list(r) if isinstance(r, tuple) else r for r in v]
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KernelConfig:
        """Rebuild a config from :meth:`to_dict` output (equal to the original).

        Raises:
            InputError: unknown fields or invalid values.
        """
        if not isinstance(d, dict):
            raise InputError(f"KernelConfig.from_dict takes a dict; got {type(d).__name__}.")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"Unknown KernelConfig field(s) {sorted(unknown)}; known: {sorted(names)}.")
        kw = dict(d)
        if kw.get("projection") is not None:
            kw["projection"] = Projection.from_dict(kw["projection"])
        return cls(**kw)

    def fingerprint(self) -> str:
        """SHA-256 of the fields that define the result (every field but the execution settings
        ``batch_size``, ``device``, ``memory_budget``, ``cache_bytes``), with ``normalize`` resolved."""
        d = {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}
        d["normalize"] = self.normalized
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


__all__ = ["KernelConfig", "EXECUTION_FIELDS"]
