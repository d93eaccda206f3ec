"""The functional view of a user's model: eval-mode context, parameter selection, logits extraction."""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn

from .errors import (
    DeviceError,
    InputError,
    ModelCallError,
    ModelOutputError,
    ParameterSelectionError,
    TangentLensError,
)
from .inputs import Batch

ParameterSpec = None | str | nn.Module | nn.Parameter | Iterable[str | nn.Module | nn.Parameter]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# the library's code runs inside the model's forward (hooks) or calls it: an exception raised in one of its
# files is the library's own, not the model's, and is never re-labelled as bad input. The demo's network is
# a user model like any other.
_USER_MODEL_FILES = frozenset({os.path.join(_PACKAGE, "demo", "network.py")})
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)
_DTYPE_WORDS = re.compile(r"dtype|scalar type|type \(|\b(Long|Int|Float|Double|Half|BFloat16|Bool)\b")
_OOM_ERRORS: tuple[type[BaseException], ...] = (
    MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
)
_OOM_WORDS = re.compile(r"out of memory|can't allocate memory|cannot allocate memory", re.IGNORECASE)
_SHAPE_WORDS = re.compile(r"shape|size|dimension|\bdims?\b|channels|mat1 and mat2|Expected .*input")


def call_model(model: nn.Module, x: Batch) -> Any:
    """Call ``model`` on a batch: ``model(**x)`` for a mapping, ``model(x)`` otherwise.

    This is the one place the library runs the user's forward (the ``torch.func`` fallback traces it with
    ``functional_call`` and, when tracing fails, comes back here through its per-example loop).

    Raises:
        ModelCallError: the model's forward raised; the message names the shapes and dtypes of the block,
            the model and what to change, and the model's exception is chained as ``__cause__``.
            The library's own typed errors, exceptions raised by its hooks and out-of-memory errors pass
            through unchanged.
    """
    try:
        if isinstance(x, Mapping):
            return model(**x)
        return model(x)
    except (TangentLensError, *_OOM_ERRORS):
        raise
    except Exception as e:
        if _raised_by_engine(e.__traceback__) or _OOM_WORDS.search(str(e)):
            raise
        raise ModelCallError(_call_failure_message(model, x, e)) from e


def _raised_by_engine(tb: TracebackType | None) -> bool:
    """Whether an exception caught in :func:`call_model` was raised in the library's own code (a hook)
    rather than in the user's model: any frame below ``call_model``'s own lies in an engine module."""
    tb = tb.tb_next if tb is not None else None  # skip call_model's frame
    while tb is not None:
        f = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if f.startswith(_PACKAGE) and f not in _USER_MODEL_FILES:
            return True
        tb = tb.tb_next
    return False


def _describe_batch(x: Batch) -> str:
    """``shape (6, 4), dtype torch.int64`` for a tensor; one such entry per key for a mapping."""

    def one(t: Any) -> str:
        if isinstance(t, torch.Tensor):
            return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
        return type(t).__name__

    if isinstance(x, Mapping):
        return "{" + "; ".join(f"{k!r}: {one(v)}" for k, v in x.items()) + "}"
    return one(x)


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first Linear/Conv/Embedding layer registered in the model (a guess at its input layer)."""
    for name, m in model.named_modules():
        if isinstance(m, _LAYERS):
            return name or "<root>", m
    return None


def _expects(layer: nn.Module) -> str:
    """What a layer accepts, in words."""
    if isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
        return "integer token ids (torch.long), e.g. shape (B, T)"
    if isinstance(layer, nn.Conv1d):
        return f"floating inputs of shape (B, {layer.in_channels}, L)"
    if isinstance(layer, nn.Conv2d):
        return f"floating inputs of shape (B, {layer.in_channels}, H, W)"
    if isinstance(layer, nn.Conv3d):
        return f"floating inputs of shape (B, {layer.in_channels}, D, H, W)"
    if isinstance(layer, nn.Linear) and not isinstance(layer, nn.LazyLinear):
        d = layer.in_features
        return f"floating inputs whose last dimension is {d}, e.g. shape (B, {d})"
    return "floating inputs"


def _call_failure_message(model: nn.Module, x: Batch, e: Exception) -> str:
    """The message of a :class:`ModelCallError`: what was passed, what failed, what to change."""
    tensors = list(x.values()) if isinstance(x, Mapping) else [x]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    call = "model(**batch)" if isinstance(x, Mapping) else "model(x)"
    head = (
        f"The model ({type(model).__name__}) raised {type(e).__name__} when tangentlens called {call} on a "
        f"block of the inputs ({_describe_batch(x)}): {e}"
    )
    first = _first_layer(model)
    layer = f"the model's first layer (`{first[0]}`: {type(first[1]).__name__})" if first else "the model"
    msg = str(e)
    int_inputs = [t for t in tensors if not t.is_floating_point() and not t.is_complex()]
    float_inputs = [t for t in tensors if t.is_floating_point()]
    is_embedding = first is not None and isinstance(first[1], (nn.Embedding, nn.EmbeddingBag))
    if int_inputs and not is_embedding and _DTYPE_WORDS.search(msg):
        want = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
        fix = (
            f" Inputs have dtype {int_inputs[0].dtype}; {layer} expects floating point — pass x.float() "
            f"(or x.to({want}))."
        )
    elif float_inputs and is_embedding and _DTYPE_WORDS.search(msg):
        fix = (
            f" Inputs have dtype {float_inputs[0].dtype}; {layer} expects integer token ids — pass x.long()."
        )
    elif _SHAPE_WORDS.search(msg):
        fix = (
            " tangentlens passes the inputs exactly as given, in blocks of up to batch_size examples along "
            "the first (batch) dimension"
            + (f"; {layer} expects {_expects(first[1])}" if first else "")
            + ". Reshape the inputs so that model(inputs[:2]) works (e.g. x.reshape(N, ...)), or pass the "
            "model that accepts them."
        )
    else:
        fix = (
            " Check that model(inputs[:2]) runs on a slice of the inputs you passed (tangentlens calls the "
            "model in eval mode on blocks of up to batch_size examples, on the compute device, with floating "
            "inputs cast to the compute dtype); fix the inputs or the model's forward."
        )
    return head.rstrip(". ") + "." + fix


def resolve_device(device: torch.device | str | int | None) -> torch.device | None:
    """Check a requested compute device; ``None`` (the model's own device) passes through.

    Raises:
        DeviceError: the string does not name a device, the device is ``meta`` (no data), or its backend
            (CUDA, MPS, ...) is not available on this machine or has no device of that index.
    """
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceError(
            f"device={device!r} is not a usable device ({e}); pass device='cpu', 'cuda', 'cuda:0' or a "
            "torch.device."
        ) from e
    if d.type == "meta":
        raise DeviceError(
            "device='meta' holds shapes but no values, so kernels cannot be computed on it; use "
            "device='cpu' (or 'cuda' where available)."
        )
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device={device!r} was requested but CUDA is not available (this PyTorch build: "
                f"{'CPU-only' if torch.version.cuda is None else 'CUDA ' + str(torch.version.cuda)}, no GPU "
                "visible); use device='cpu'."
            )
        n = torch.cuda.device_count()
        index = torch.cuda.current_device() if d.index is None else d.index
        if index >= n:
            raise DeviceError(
                f"device={device!r} does not exist: {n} CUDA device(s) are visible; use "
                f"{', '.join(f'cuda:{i}' for i in range(n))} or 'cpu'."
            )
        return torch.device("cuda", index)
    if d.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device={device!r} was requested but MPS is not available; use device='cpu'.")
        return d
    if d.type != "cpu":
        backend = getattr(torch, d.type, None)
        available = getattr(backend, "is_available", None)
        if callable(available) and not available():
            raise DeviceError(
                f"device={device!r} was requested but the {d.type!r} backend is not available; use "
                "device='cpu'."
            )
    return d


def extract_logits(out: Any, batch: int | None = None, check: bool = True) -> torch.Tensor:
    """Return the (B, C) logits of a model output.

    Tensors are taken as they are; tuples and lists give their first element; objects with a ``logits``
    attribute or key (Hugging Face ``ModelOutput``) give that. ``check=False`` skips the data-dependent
    probability check (needed inside ``torch.func`` transforms).

    Raises:
        ModelOutputError: the output is not a 2-D floating tensor with ``batch`` rows, or looks like
            probabilities (rows in [0, 1] summing to 1) rather than logits.
    """
    if isinstance(out, torch.Tensor):
        logits = out
    elif hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        logits = out.logits
    elif isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        logits = out["logits"]
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    else:
        raise ModelOutputError(
            f"Cannot find logits in a model output of type {type(out).__name__}; return a tensor, a tuple "
            "whose first element is the logits, or an object with a `logits` attribute."
        )
    if logits.dim() != 2:
        hint = " (for one output, return shape (B, 1), e.g. `out.unsqueeze(-1)`)" if logits.dim() == 1 else ""
        raise ModelOutputError(
            f"The model must return 2-D logits of shape (batch, classes); got shape {tuple(logits.shape)}"
            f"{hint}."
        )
    if not logits.is_floating_point():
        raise ModelOutputError(f"Logits must be floating point; got {logits.dtype}.")
    if batch is not None and logits.shape[0] != batch:
        raise ModelOutputError(
            f"The model returned {logits.shape[0]} rows for a batch of {batch} examples; "
            "it must return one row of logits per example."
        )
    if check and logits.shape[1] > 1 and logits.shape[0] > 0:
        with torch.no_grad():
            d = logits.detach()
            if bool(((d >= 0) & (d <= 1)).all()) and bool(
                torch.allclose(d.sum(1), torch.ones_like(d[:, 0]), atol=1e-5)
            ):
                raise ModelOutputError(
                    "The model output looks like probabilities (rows in [0, 1] summing to 1). Kernels are "
                    "defined on logits: remove the final softmax from the model."
                )
    return logits


def select_parameters(model: nn.Module, spec: ParameterSpec) -> dict[str, nn.Parameter]:
    """Resolve a parameter selection to an ordered ``{name: parameter}`` dict (``named_parameters`` order).

    ``spec`` may be ``None`` (every parameter with ``requires_grad``), a parameter or module name (a module
    name selects all its parameters), a module, a parameter, or an iterable of those. An explicit selection
    may name frozen parameters (they are differentiated anyway; their flags are restored afterwards).

    Raises:
        ParameterSelectionError: a name, module or parameter does not belong to the model, nothing is
            selected, or ``spec`` is ``None`` and every parameter is frozen (``requires_grad=False``).
    """
    named = dict(model.named_parameters())
    if spec is None:
        if not named:
            raise ParameterSelectionError(
                "The model has no parameters; nothing to differentiate. Use kind='em' or kind='ck' (forward-"
                "only kernels), or pass a model with parameters."
            )
        sel = {n: p for n, p in named.items() if p.requires_grad}
        if not sel:
            raise ParameterSelectionError(
                f"Every parameter of the model ({len(named)} tensors, e.g. {list(named)[:3]}) is frozen "
                "(requires_grad=False), so there is no trainable parameter to take gradients of. Unfreeze "
                "the ones to use (`for p in model.parameters(): p.requires_grad_(True)`), or pass them "
                "explicitly with parameters=... (e.g. parameters=model for all, or "
                "parameters=['fc.weight']); an explicit selection may include frozen parameters."
            )
        return sel
    items = [spec] if isinstance(spec, (str, nn.Module, nn.Parameter)) else list(spec)
    by_id = {id(p): n for n, p in named.items()}
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for it in items:
        if isinstance(it, nn.Parameter):
            if id(it) not in by_id:
                raise ParameterSelectionError("A selected nn.Parameter does not belong to the model.")
            chosen.add(by_id[id(it)])
        elif isinstance(it, nn.Module):
            found = [by_id[id(p)] for p in it.parameters() if id(p) in by_id]
            if not found:
                raise ParameterSelectionError(
                    f"The selected module {type(it).__name__} has no parameters in the model."
                )
            chosen.update(found)
        elif isinstance(it, str):
            if it in named:
                chosen.add(it)
            elif it in modules:
                found = [n for n in named if n.startswith(it + ".") or it == ""]
                if not found:
                    raise ParameterSelectionError(f"Module {it!r} has no parameters.")
                chosen.update(found)
            else:
                close = [n for n in list(named) + list(modules) if it.split(".")[-1] in n][:5]
                raise ParameterSelectionError(
                    f"No parameter or module named {it!r} in the model. Names look like: "
                    f"{close or list(named)[:5]}."
                )
        else:
            raise ParameterSelectionError(
                f"Cannot select parameters by {type(it).__name__}; pass names, modules or parameters."
            )
    return {n: p for n, p in named.items() if n in chosen}


def check_materialized(model: nn.Module) -> None:
    """Check that the model's parameters and buffers hold values (none is on the ``meta`` device).

    Raises:
        DeviceError: a parameter or buffer is on ``meta``.
    """
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if meta:
        raise DeviceError(
            f"The model ({type(model).__name__}) has {len(meta)} parameter(s)/buffer(s) on the 'meta' device "
            f"(e.g. {meta[:3]}): shapes without values, as built under torch.device('meta') or loaded with "
            "empty weights. Materialize it first, e.g. model.to_empty(device='cpu') then "
            "model.load_state_dict(state), or load it without device_map='meta' / init_empty_weights."
        )


def place(
    model: nn.Module,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> tuple[nn.Module, torch.device, torch.dtype]:
    """The model on ``device`` with floating parameters in ``dtype``: the caller's model itself when it
    already has them, else a converted deep copy (the caller's model is never converted).

    Raises:
        DeviceError: ``device`` is unavailable or ``meta``, or the model's parameters are on ``meta``.
        InputError: ``dtype`` is not a floating dtype.
    """
    want = resolve_device(device)
    check_materialized(model)
    params = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    cur_dtype = next((p.dtype for p in params if p.is_floating_point()), torch.get_default_dtype())
    cur_device = params[0].device if params else torch.device("cpu")
    want_dtype = dtype or cur_dtype
    want_device = want if want is not None else cur_device
    if not isinstance(want_dtype, torch.dtype) or not want_dtype.is_floating_point:
        raise InputError(f"dtype must be a floating dtype (e.g. torch.float64); got {want_dtype}.")
    if want_dtype != cur_dtype or want_device != cur_device:
        return copy.deepcopy(model).to(device=want_device, dtype=want_dtype), want_device, want_dtype
    return model, want_device, want_dtype


@contextlib.contextmanager
def eval_mode(model: nn.Module, work: nn.Module | None = None) -> Iterator[None]:
    """Put ``work`` (default ``model``) in eval mode; restore every submodule's mode of ``model`` on exit."""
    modes = {m: m.training for m in model.modules()}
    try:
        (model if work is None else work).eval()
        yield
    finally:
        for m, t in modes.items():
            m.training = t


@contextlib.contextmanager
def prepared(
    model: nn.Module,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> Iterator[tuple[nn.Module, torch.device, torch.dtype]]:
    """Yield a model in eval mode on ``device`` with floating parameters in ``dtype``.

    The caller's model is used in place when it already has that device and dtype (its train/eval mode of
    every submodule is restored on exit); otherwise a deep copy is converted, leaving the caller's untouched.

    Raises:
        DeviceError, InputError: see :func:`place`.
    """
    work, dev, dt = place(model, device=device, dtype=dtype)
    with eval_mode(model, work):
        yield work, dev, dt


@contextlib.contextmanager
def requiring_grad(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Temporarily set ``requires_grad=True`` on ``params``; restore the caller's flags on exit."""
    ps = list(params)
    flags = [p.requires_grad for p in ps]
    try:
        for p in ps:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(ps, flags):
            p.requires_grad_(f)


class HookStash:
    """Takes the hooks installed on a model's modules since a mark off the model, and puts them back.

    Hooks are recognised by their entries in the modules' hook dictionaries (``_forward_hooks``,
    ``_forward_pre_hooks``, their ``with_kwargs`` / ``always_called`` companions, backward and state-dict
    hooks), so whatever the engine installs — however it registers it — is found, and hooks the caller
    adds in between are never touched. Put-back entries keep their ids, so the engine's own handles still
    remove them.

    Usage: :meth:`mark` before the engine installs hooks, :meth:`stash` to take them off, :meth:`restore`
    to put them back (it marks again first).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._baseline: dict[tuple[int, str], set[Any]] = {}
        self._saved: list[tuple[dict[Any, Any], Any, Any]] = []
        self._found: list[tuple[tuple[int, str], dict[Any, Any]]] | None = None

    def _dicts(self) -> list[tuple[tuple[int, str], dict[Any, Any]]]:
        # found once: modules keep their hook dictionaries for life, and scanning every module's
        # attributes per block costs milliseconds on a large model
        if self._found is None:
            self._found = [
                ((id(m), name), d)
                for m in self.model.modules()
                for name, d in vars(m).items()
                if name.startswith("_") and "hooks" in name and isinstance(d, dict)
            ]
        return self._found

    def mark(self) -> None:
        """Remember the hooks present now (the caller's): they are never stashed."""
        self._baseline = {key: set(d) for key, d in self._dicts() if d}

    def stash(self) -> None:
        """Take every hook added since the mark off the model (kept for :meth:`restore`)."""
        for key, d in self._dicts():
            if not d:
                continue
            base = self._baseline.get(key, set())
            for k in [k for k in d if k not in base]:
                self._saved.append((d, k, d.pop(k)))

    def restore(self) -> None:
        """Put the stashed hooks back (after marking the hooks present now)."""
        self.mark()
        for d, k, v in self._saved:
            d[k] = v
        self._saved = []

