"""The TOML configuration of the ``tangentlens`` commands for your own model, read and validated once.

A config file names the model factory and checkpoint, the data factory, the kernels (each a
:class:`~tangentlens.KernelConfig` with an optional projection), the store folder and the settings of the
surrogate fits, explanations, attributions and the report. :func:`load_config` reads it and returns a
:class:`RunConfig`, or raises :class:`ConfigError` naming the file, the table, the key and what to write
instead. Relative paths (checkpoint, store, outputs, ``python_path``) are relative to the config file's
folder.
Nothing is imported or loaded here: :mod:`tangentlens.cli.loading` calls the factories.
"""

from __future__ import annotations

import math
import numbers
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import KernelConfig
from ..errors import InputError
from ..projection import Projection

__all__ = [
    "EXAMPLE",
    "AttributeSection",
    "ConfigError",
    "DataSection",
    "ExplainSection",
    "FactorySpec",
    "KernelSection",
    "ModelSection",
    "ReportSection",
    "RunConfig",
    "StoreSection",
    "SurrogateSection",
    "load_config",
    "parse_config",
]

#: A complete example configuration (the README's; ``tangentlens`` commands print it on a bad config).
EXAMPLE = """\
python_path = ["."]                       # folders added to sys.path to import the factories

[model]
factory = "mypackage.models:make_model"   # package.module:function returning an nn.Module
options = { hidden = 64 }                 # keyword arguments of the factory (optional)
checkpoint = "checkpoints/model.pt"       # torch.save(model.state_dict(), ...) (optional)

[data]
factory = "mypackage.data:load_data"      # returns {"x_train", "y_train", "x_test", "y_test"}
inputs = "auto"                           # "image", "text", "tabular" or "auto" (how the report shows them)

[kernels.trNTK]                           # one table per kernel: KernelConfig's fields
kind = "trntk"

[kernels.proj-pNTK]
kind = "pntk"
normalize = true
projection = { dim = 512, kind = "sjlt", seed = 0 }

[store]
path = "tangentlens-store"                # features, kernels, surrogates, explanations

[surrogate]
targets = ["labels", "distilled"]
alpha = 1e-4

[explain]
points = 100                              # the first 100 test points
k = 5

[attribute]
points = 100
k = 5

[report]
out = "tangentlens-report"
"""

_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_INPUTS = ("auto", "image", "text", "tabular")
_TARGETS = ("labels", "distilled")
_SOLVERS = ("auto", "primal", "dual")
_LABELS = ("predicted", "true")
_PROJECTION_KEYS = ("dim", "kind", "seed", "scale", "s", "kron_dim", "fold", "fallback", "tile")


class ConfigError(InputError):
    """The TOML configuration of a ``tangentlens`` command is invalid; the message names the file, the
    table and the key, and says what to write instead."""


# ----------------------------------------------------------------------------------------------------------
# The sections.
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FactorySpec:
    """A callable named ``package.module:function`` and the keyword arguments it is called with."""

    module: str
    function: str
    options: dict[str, Any]
    where: str  # e.g. "[model] factory" (for error messages)

    @property
    def text(self) -> str:
        """``"package.module:function"``."""
        return f"{self.module}:{self.function}"


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: the factory, the checkpoint and how it is read."""

    factory: FactorySpec
    checkpoint: Path | None
    checkpoint_key: str | None
    weights_only: bool
    id: str | None


@dataclass(frozen=True)
class DataSection:
    """``[data]``: the data factory and how the report shows the inputs."""

    factory: FactorySpec
    inputs: str


@dataclass(frozen=True)
class KernelSection:
    """One ``[kernels.NAME]`` table: the validated :class:`KernelConfig` and, for the label kinds, the
    label mode of both sides (``"predicted"``: the network's predictions; ``"true"``: the data's labels)."""

    name: str
    config: KernelConfig
    labels: str


@dataclass(frozen=True)
class StoreSection:
    """``[store]``: the folder of the feature / kernel stores and the fitted surrogates."""

    path: Path
    chunk_rows: int | None
    block_rows: int


@dataclass(frozen=True)
class SurrogateSection:
    """``[surrogate]``: which kGLMs ``fit`` fits (true labels, distilled from the network) and how."""

    targets: tuple[str, ...]
    alpha: float
    solver: str
    max_iter: int | None


@dataclass(frozen=True)
class ExplainSection:
    """``[explain]``: the test points, the kernel and surrogate that explain them, and the output file."""

    kernel: str
    target: str
    points: tuple[int, ...] | int
    k: int
    out: Path


@dataclass(frozen=True)
class AttributeSection:
    """``[attribute]``: counterfactual attribution (:func:`tangentlens.attribute`) settings."""

    points: tuple[int, ...] | int
    k: int
    labels: str
    projection: Projection | None
    lam: float | None
    out: Path


@dataclass(frozen=True)
class ReportSection:
    """``[report]``: the report folder, the kernels it compares and the gallery's size."""

    out: Path
    kernels: tuple[str, ...]
    gallery_rows: int
    top_k: int
    alpha: float
    title: str | None


@dataclass(frozen=True)
class RunConfig:
    """A validated configuration file.

    Attributes:
        path: the file.
        root: its folder (relative paths are relative to it).
        python_path: folders put on ``sys.path`` while the factories are imported.
        model, data, store, surrogate, explain, attribute, report: the sections.
        kernels: the ``[kernels.NAME]`` tables, in file order.
    """

    path: Path
    root: Path
    python_path: tuple[Path, ...]
    model: ModelSection
    data: DataSection
    kernels: tuple[KernelSection, ...]
    store: StoreSection
    surrogate: SurrogateSection
    explain: ExplainSection
    attribute: AttributeSection
    report: ReportSection

    def kernel(self, name: str) -> KernelSection:
        """The kernel table called ``name``.

        Raises:
            ConfigError: no such table.
        """
        for k in self.kernels:
            if k.name == name:
                return k
        raise ConfigError(f"{self.path}: no [kernels.{name}] table; the kernels are "
                          f"{[k.name for k in self.kernels]}.")

    def kernel_dir(self, name: str) -> Path:
        """The store folder of one kernel: ``<store>/<name>``."""
        return self.store.path / name


# ----------------------------------------------------------------------------------------------------------
# Reading values.
# ----------------------------------------------------------------------------------------------------------
class _Table:
    """One TOML table being read: typed getters that raise :class:`ConfigError` naming the key."""

    def __init__(self, file: Path, name: str, data: Any, known: tuple[str, ...]) -> None:
        self.file, self.name = file, name
        if not isinstance(data, Mapping):
            raise ConfigError(f"{file}: {name} must be a table ([{name.strip('[]')}] ...), got "
                              f"{type(data).__name__} {data!r}.")
        self.data = dict(data)
        unknown = [k for k in self.data if k not in known]
        if unknown:
            raise ConfigError(f"{file}: {name} has unknown key(s) {unknown}; the keys of {name} are "
                              f"{list(known)}. Check the spelling, or remove them.")

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.name} {key}: {problem}")

    def get(self, key: str, default: Any, check: Callable[[Any], bool], want: str) -> Any:
        if key not in self.data:
            return default
        value = self.data[key]
        if not check(value):
            raise self.error(key, f"expected {want}, got {value!r}.")
        return value

    def required(self, key: str, example: str) -> Any:
        if key not in self.data:
            raise self.error(key, f"missing; add it, e.g. {key} = {example}")
        return self.data[key]

    def string(self, key: str, default: str | None, choices: tuple[str, ...] | None = None) -> Any:
        value = self.get(key, default, lambda v: isinstance(v, str) and bool(v), "a non-empty string")
        if choices is not None and value not in choices:
            raise self.error(key, f"must be one of {list(choices)}, got {value!r}.")
        return value

    def integer(self, key: str, default: int | None, minimum: int = 1) -> Any:
        return self.get(key, default, lambda v: _is_int(v) and v >= minimum, f"an integer >= {minimum}")

    def number(self, key: str, default: float | None, positive: bool = True) -> Any:
        value = self.get(key, default, lambda v: _is_number(v) and (v > 0 or not positive),
                         "a positive number" if positive else "a number")
        return None if value is None else float(value)

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self.get(key, default, lambda v: isinstance(v, bool), "true or false"))

    def path(self, key: str, default: str | None, root: Path) -> Path | None:
        value = self.string(key, default)
        return None if value is None else (root / Path(value).expanduser()).resolve()

    def table(self, key: str) -> dict[str, Any]:
        return dict(self.get(key, {}, lambda v: isinstance(v, Mapping), "a table, e.g. { hidden = 64 }"))

    def points(self, key: str, default: int) -> tuple[int, ...] | int:
        value = self.get(
            key, default,
            lambda v: (_is_int(v) and v >= 1) or (isinstance(v, list) and bool(v)
                                                 and all(_is_int(i) and i >= 0 for i in v)),
            "a number of test points (the first n) or a list of test indices, e.g. [0, 5, 17]")
        return tuple(value) if isinstance(value, list) else int(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _factory(t: _Table, example: str) -> FactorySpec:
    text = t.required("factory", f'"{example}"')
    if not isinstance(text, str) or not _FACTORY.match(text):
        raise t.error("factory", f"{text!r} is not \"package.module:function\"; write the module's dotted "
                                 f"import path, a colon and the function's name, e.g. \"{example}\".")
    module, function = text.split(":")
    return FactorySpec(module, function, t.table("options"), f"{t.name} factory")


def _projection(file: Path, where: str, value: Any) -> Projection | None:
    if value is None:
        return None
    t = _Table(file, where, value, _PROJECTION_KEYS)
    if "dim" not in t.data:
        raise t.error("dim", "missing; a projection needs its dimension, e.g. "
                             "{ dim = 512, kind = \"sjlt\" }.")
    try:
        return Projection(**t.data)
    except (InputError, ValueError, TypeError) as exc:
        raise ConfigError(f"{file}: {where}: {exc}") from None


def _kernel(file: Path, name: str, value: Any) -> KernelSection:
    if not _NAME.match(name):
        raise ConfigError(f"{file}: [kernels.{name}]: a kernel's name is also its store folder; use letters, "
                          "digits and . _ + - only (e.g. [kernels.proj-pNTK]).")
    where = f"[kernels.{name}]"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{file}: {where} must be a table of KernelConfig fields, e.g. kind = \"trntk\".")
    d = dict(value)
    if "kind" not in d:
        raise ConfigError(f"{file}: {where} kind: missing; add e.g. kind = \"trntk\" (the kinds: "
                          f"{sorted(_kinds())}).")
    labels = d.pop("labels", "predicted")
    if labels not in _LABELS:
        raise ConfigError(f"{file}: {where} labels: must be one of {list(_LABELS)} (the label kinds' label "
                          f"mode for training and test points), got {labels!r}.")
    projection = _projection(file, f"{where} projection", d.pop("projection", None))
    try:
        cfg = KernelConfig.from_dict(d)
        if projection is not None:
            cfg = cfg.replace(projection=projection)
    except InputError as exc:  # unknown fields, bad values, options the kind does not take
        raise ConfigError(f"{file}: {where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{file}: {where}: {exc}") from None
    if cfg.spec.full:
        raise ConfigError(f"{file}: {where} kind: 'entk' gives C x C blocks per pair of points, which the "
                          "commands' surrogates do not take; use 'trntk', 'trntk0' or 'pntk'.")
    if "labels" in value and not cfg.spec.needs_labels:
        raise ConfigError(f"{file}: {where} labels: applies only to the label kinds ('gradcos', 'margin'), "
                          f"not to kind={cfg.kind!r}; remove it.")
    return KernelSection(name, cfg, labels)


def _kinds() -> list[str]:
    from ..kinds import KINDS

    return list(KINDS)


# ----------------------------------------------------------------------------------------------------------
# The file.
# ----------------------------------------------------------------------------------------------------------
_TOP = ("python_path", "model", "data", "kernels", "store", "surrogate", "explain", "attribute", "report")


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML configuration file.

    Args:
        path: the ``.toml`` file.

    Returns:
        The :class:`RunConfig`. Cost: reading the file; no factory is imported.

    Raises:
        ConfigError: the file is missing, not TOML, or a key is unknown, missing or invalid (the message
            names the table and key and says what to write).
    """
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; write one (see `tangentlens "
                          "featurize --help`, or the README's 'Your own model').")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file} is not valid TOML: {exc}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file} is not UTF-8 text; save it as UTF-8.") from None
    return parse_config(data, file)


def parse_config(data: Mapping[str, Any], file: Path) -> RunConfig:
    """Validate the parsed TOML ``data`` of ``file`` (see :func:`load_config`).

    Raises:
        ConfigError: as :func:`load_config`.
    """
    root = file.parent
    top = _Table(file, "the file", data, _TOP)
    paths = top.get("python_path", ["."],
                    lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
                    "a list of folders, e.g. [\".\", \"src\"]")
    for key in ("model", "data"):
        if key not in data:
            raise ConfigError(f"{file}: the [{key}] table is missing; add it, e.g.\n\n{EXAMPLE}")
    mt = _Table(file, "[model]", data["model"],
                ("factory", "options", "checkpoint", "checkpoint_key", "weights_only", "id"))
    model = ModelSection(
        factory=_factory(mt, "mypackage.models:make_model"),
        checkpoint=mt.path("checkpoint", None, root),
        checkpoint_key=mt.string("checkpoint_key", None),
        weights_only=mt.boolean("weights_only", True),
        id=mt.string("id", None),
    )
    if model.checkpoint is not None and not model.checkpoint.is_file():
        raise mt.error("checkpoint", f"{str(model.checkpoint)!r} does not exist; write the path of the "
                                     "file saved with torch.save(model.state_dict(), path) (relative to the "
                                     "config file's folder), or remove the key to use the factory's weights.")
    dt = _Table(file, "[data]", data["data"], ("factory", "options", "inputs"))
    data_section = DataSection(_factory(dt, "mypackage.data:load_data"), dt.string("inputs", "auto", _INPUTS))

    kt = data.get("kernels")
    if not isinstance(kt, Mapping) or not kt:
        raise ConfigError(f"{file}: no kernel; add at least one [kernels.NAME] table, e.g.\n\n"
                          "[kernels.trNTK]\nkind = \"trntk\"\n")
    kernels = tuple(_kernel(file, name, value) for name, value in kt.items())
    names = [k.name for k in kernels]

    st = _Table(file, "[store]", data.get("store", {}), ("path", "chunk_rows", "block_rows"))
    store = StoreSection(st.path("path", "tangentlens-store", root) or root,  # type: ignore[arg-type]
                         st.integer("chunk_rows", None), st.integer("block_rows", 4096))

    su = _Table(file, "[surrogate]", data.get("surrogate", {}), ("targets", "alpha", "solver", "max_iter"))
    targets = su.get("targets", list(_TARGETS),
                     lambda v: isinstance(v, list) and bool(v) and all(t in _TARGETS for t in v)
                     and len(set(v)) == len(v),
                     f"a list of distinct targets from {list(_TARGETS)}")
    surrogate = SurrogateSection(tuple(targets), su.number("alpha", 1e-4),
                                 su.string("solver", "auto", _SOLVERS), su.integer("max_iter", None))

    et = _Table(file, "[explain]", data.get("explain", {}), ("kernel", "target", "points", "k", "out"))
    explain = ExplainSection(
        kernel=et.string("kernel", names[0], tuple(names)),
        target=et.string("target", surrogate.targets[0], surrogate.targets),
        points=et.points("points", 100), k=et.integer("k", 5),
        out=et.path("out", str(store.path / "explanations.json"), root),  # type: ignore[arg-type]
    )

    at = _Table(file, "[attribute]", data.get("attribute", {}),
                ("points", "k", "labels", "projection", "lam", "out"))
    attribute = AttributeSection(
        points=at.points("points", 100), k=at.integer("k", 5),
        labels=at.string("labels", "true", _LABELS),
        projection=_projection(file, "[attribute] projection", at.data.get("projection")),
        lam=at.number("lam", None),
        out=at.path("out", str(store.path / "attributions.json"), root),  # type: ignore[arg-type]
    )

    rt = _Table(file, "[report]", data.get("report", {}),
                ("out", "kernels", "gallery_rows", "top_k", "alpha", "title"))
    report = ReportSection(
        out=rt.path("out", "tangentlens-report", root),  # type: ignore[arg-type]
        kernels=tuple(rt.get("kernels", names,
                             lambda v: isinstance(v, list) and bool(v) and all(n in names for n in v),
                             f"a list of kernel names from {names}")),
        gallery_rows=rt.integer("gallery_rows", 4), top_k=rt.integer("top_k", 3),
        alpha=rt.number("alpha", surrogate.alpha),  # type: ignore[arg-type]
        title=rt.string("title", None),
    )
    return RunConfig(file, root, tuple((root / p).resolve() for p in paths), model, data_section, kernels,
                     store, surrogate, explain, attribute, report)
