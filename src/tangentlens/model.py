"""The functional view of a user's model: eval-mode context, parameter selection, logits extraction."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import InputError, ModelOutputError, ParameterSelectionError
from .inputs import Batch

ParameterSpec = None | str | nn.Module | nn.Parameter | Iterable[str | nn.Module | nn.Parameter]


def call_model(model: nn.Module, x: Batch) -> Any:
    """Call ``model`` on a batch: ``model(**x)`` for a mapping, ``model(x)`` otherwise."""
    if isinstance(x, Mapping):
        return model(**x)
    return model(x)


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

    ``spec`` may be ``None`` (all parameters with ``requires_grad``; all parameters if none does), a
    parameter or module name (a module name selects all its parameters), a module, a parameter, or an
    iterable of those.

    Raises:
        ParameterSelectionError: a name, module or parameter does not belong to the model, or nothing is
            selected.
    """
    named = dict(model.named_parameters())
    if spec is None:
        sel = {n: p for n, p in named.items() if p.requires_grad}
        if not sel:
            sel = dict(named)
        if not sel:
            raise ParameterSelectionError("The model has no parameters; nothing to differentiate.")
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
    """
    params = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    cur_dtype = next((p.dtype for p in params if p.is_floating_point()), torch.get_default_dtype())
    cur_device = params[0].device if params else torch.device("cpu")
    want_dtype = dtype or cur_dtype
    want_device = torch.device(device) if device is not None else cur_device
    if not want_dtype.is_floating_point:
        raise InputError(f"dtype must be a floating dtype (e.g. torch.float64); got {want_dtype}.")
    modes = {m: m.training for m in model.modules()}
    if want_dtype != cur_dtype or want_device != cur_device:
        work = copy.deepcopy(model).to(device=want_device, dtype=want_dtype)
    else:
        work = model
    try:
        work.eval()
        yield work, want_device, want_dtype
    finally:
        for m, t in modes.items():
            m.training = t


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
