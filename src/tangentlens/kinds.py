"""Kernel kinds as data: what each kind differentiates, how it is assembled, which options it accepts."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError, UnknownKindError

# Options of kernel / train_test_kernels / features / iter_features that only some kinds accept: the
# option's name -> (its default: any other value is "given", what accepts it in words). Which kinds accept
# which of them is the ``options`` field of each KindSpec below.
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "hooks", "functional")
"""How per-example gradients are taken: layer rules with the exact fallback, rules only, or torch.func."""

GRADIENT_OPTIONS: frozenset[str] = frozenset({"parameters", "projection", "implementation"})
TRACE_OPTIONS: frozenset[str] = GRADIENT_OPTIONS | {"probes", "probe_seed"}
LABEL_OPTIONS: frozenset[str] = frozenset({"labels", "other_labels", "test_labels"})
OPTION_DEFAULTS: dict[str, object] = {
    "parameters": None,
    "projection": None,
    "implementation": "auto",
    "probes": None,
    "probe_seed": 0,
    "labels": None,
    "other_labels": None,
    "test_labels": None,
    "modules": None,
}
OPTION_GROUPS: dict[str, str] = {
    "parameters": "gradient kernels",
    "projection": "gradient kernels",
    "implementation": "gradient kernels",
    "probes": "the trace kinds",
    "probe_seed": "the trace kinds (with probes=)",
    "labels": "the label kinds",
    "other_labels": "the label kinds",
    "test_labels": "the label kinds",
    "modules": "the embedding kind",
}


@dataclass(frozen=True)
class KindSpec:
    """What a kernel kind differentiates, how it is assembled and which options it accepts.

    Attributes:
        name: the kind's name.
        probes: "onehot" (the C logits: trace / full eNTK), "sum" (Σ_c f_c / √C: pseudo-NTK),
            "loss" (∂L/∂f: loss gradient), "margin" (∂m/∂f of TRAK's margin m = f_y − logsumexp_{c≠y} f_c),
            or "none" (forward-only kinds).
        full: keep every probe pair (the C×C eNTK blocks) instead of the trace over matching probes.
        normalize: default of the block-aware cosine normalization.
        needs_labels: labels are required (loss gradients, margins).
        leaks_labels: true labels of the explained points leak into a surrogate built on this kernel
            (Grad-Cos): warned about; the margin kind's labels define the attributed output instead.
        options: the kind-specific options (keys of ``OPTION_DEFAULTS``) this kind accepts; passing any
            other of them with a non-default value is an error (:func:`check_options`).
    """

    name: str
    probes: str
    full: bool
    normalize: bool
    needs_labels: bool = False
    leaks_labels: bool = False
    options: frozenset[str] = frozenset()

    @property
    def gradients(self) -> bool:
        """The kind is built from per-example parameter gradients (not forward activations)."""
        return self.probes != "none"


KINDS: dict[str, KindSpec] = {
    "entk": KindSpec("entk", "onehot", True, False, options=GRADIENT_OPTIONS),
    "trntk": KindSpec("trntk", "onehot", False, True, options=TRACE_OPTIONS),
    "trntk0": KindSpec("trntk0", "onehot", False, False, options=TRACE_OPTIONS),
    "pntk": KindSpec("pntk", "sum", False, False, options=TRACE_OPTIONS),
    "gradcos": KindSpec("gradcos", "loss", False, True, needs_labels=True, leaks_labels=True,
                        options=GRADIENT_OPTIONS | LABEL_OPTIONS),
    # margin gradients (TRAK's output function; counterfactual attribution uses the raw kernel)
    "margin": KindSpec("margin", "margin", False, False, needs_labels=True,
                       options=GRADIENT_OPTIONS | LABEL_OPTIONS),
    "em": KindSpec("em", "none", False, True, options=frozenset({"modules"})),
    "ck": KindSpec("ck", "none", False, True),
}


def kind_spec(kind: str) -> KindSpec:
    """Look up a kind; raise :class:`UnknownKindError` listing the valid ones."""
    if not isinstance(kind, str) or kind.lower() not in KINDS:
        raise UnknownKindError(f"Unknown kernel kind {kind!r}; choose one of {sorted(KINDS)}.")
    return KINDS[kind.lower()]


def kinds_accepting(option: str) -> list[str]:
    """The kinds that accept a kind-specific option, in registry order."""
    return [k for k, spec in KINDS.items() if option in spec.options]


def _is_default(option: str, value: object) -> bool:
    default = OPTION_DEFAULTS[option]
    if isinstance(default, str):
        return isinstance(value, str) and value == default
    if default is None or value is None or isinstance(value, (bool, str)):
        return value is default
    try:
        return bool(value == default)
    except (TypeError, ValueError, RuntimeError):  # e.g. a multi-element tensor
        return False


def check_options(spec: KindSpec, **given: object) -> None:
    """Reject kind-specific options the kind does not accept (only non-default values count).

    Args:
        spec: the kind.
        **given: option name (a key of ``OPTION_DEFAULTS``) -> the value the caller passed.

    Raises:
        InputError: an option with a non-default value does not apply to ``spec``; the message names
            the kinds it applies to.
    """
    for option, value in given.items():
        if option in spec.options or _is_default(option, value):
            continue
        kinds = kinds_accepting(option)
        names = ", ".join(repr(k) for k in kinds)
        default = OPTION_DEFAULTS[option]
        use = f"kind={kinds[0]!r}" if len(kinds) == 1 else "one of those kinds"
        raise InputError(
            f"{option}= applies only to {OPTION_GROUPS[option]} ({names}), not to kind={spec.name!r}: remove "
            f"{option}= (or pass {option}={default!r}), or use {use}."
        )
