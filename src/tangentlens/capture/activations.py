"""Forward-only captures: the activations of chosen modules (Em) or the last Linear's input (CK).

The embedding kernel (Em) and the conjugate kernel (CK) need no gradient: a forward hook records the
flattened activations ``(B, d)`` of each chosen module during one ``no_grad`` forward per block, stored as
:class:`~.caps.DenseCap` with one "probe", so the same Gram products serve them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, NonFiniteError
from ..inputs import Batch, batch_size_of
from ..network import call_model, extract_logits
from .caps import BlockCapture, DenseCap


class ActivationCapture:
    """Forward hooks recording flattened activations: module outputs (Em) or the last Linear's input (CK).

    Args:
        model: a prepared model.
        kind: ``"em"`` (the chosen modules' outputs) or ``"ck"`` (the input of the last ``nn.Linear``
            called in the forward).
        modules: the modules (names or module objects) for ``"em"``; None: every Linear, Conv and
            Embedding called in the forward except the last Linear (learned from the first forward).

    Raises:
        InputError: a module is not in the model, or ``modules`` holds something else.
    """

    def __init__(self, model: nn.Module, kind: str, modules: Sequence[str | nn.Module] | None) -> None:
        self.model = model
        self.kind = kind
        self.store: dict[str, list[Tensor]] = {}
        self.handles: list[Any] = []
        self.names: list[str] = []
        named = dict(model.named_modules())
        by_obj = {id(m): n for n, m in named.items()}
        order: list[str] = []
        probe_handles = []
        if modules is None or kind == "ck":
            # learn the call order of the candidate modules from the first forward
            for n, m in named.items():
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
                    probe_handles.append(m.register_forward_hook(
                        lambda mod, a, o, n=n: order.append(n) if n not in order else None))
            self._order = order
            self._probe_handles = probe_handles
            self.modules: list[str] | None = None
        else:
            sel = []
            for m in modules:
                if isinstance(m, str):
                    if m not in named:
                        raise InputError(f"No module named {m!r} in the model.")
                    sel.append(m)
                elif isinstance(m, nn.Module) and id(m) in by_obj:
                    sel.append(by_obj[id(m)])
                else:
                    raise InputError("modules= must list module names or modules of the model.")
            self.modules = sel
            self._probe_handles = []
            self._install(sel)

    def _install(self, names: list[str]) -> None:
        named = dict(self.model.named_modules())
        self.names = names
        for n in names:
            if self.kind == "ck":
                h = named[n].register_forward_hook(
                    lambda mod, a, o, n=n: self.store.setdefault(n, []).append(
                        a[0].detach().reshape(a[0].shape[0], -1)))
            else:
                h = named[n].register_forward_hook(
                    lambda mod, a, o, n=n: self.store.setdefault(n, []).append(
                        _first_tensor(o).detach().reshape(_first_tensor(o).shape[0], -1)))
            self.handles.append(h)

    def close(self) -> None:
        """Remove every hook."""
        for h in self.handles + self._probe_handles:
            h.remove()

    def capture(self, x: Batch) -> BlockCapture:
        """One ``no_grad`` forward: a :class:`~.caps.DenseCap` ``{name: (B, 1, d)}`` per chosen module.

        Raises:
            InputError: no module fits the kind, or a chosen module was not called.
            NonFiniteError: NaN or infinite activations.
        """
        B = batch_size_of(x)
        self.store = {}
        with torch.no_grad():
            extract_logits(call_model(self.model, x), B)  # validates the output
        if self.modules is None and not self.names:
            for h in self._probe_handles:
                h.remove()
            self._probe_handles = []
            linears = [n for n in self._order if isinstance(dict(self.model.named_modules())[n], nn.Linear)]
            if self.kind == "ck":
                if not linears:
                    raise InputError("kind='ck' needs a final nn.Linear layer (its input is the feature).")
                chosen = [linears[-1]]
            else:
                chosen = [n for n in self._order if n != (linears[-1] if linears else None)]
                if not chosen:
                    raise InputError("kind='em' found no layer outputs to use; pass modules=[...].")
            self._install(chosen)
            return self.capture(x)
        caps = []
        for n in self.names:
            parts = self.store.get(n)
            if not parts:
                raise InputError(f"Module {n!r} was not called during the forward pass.")
            a = torch.cat(parts, 1)
            if not torch.isfinite(a).all():
                raise NonFiniteError(f"NaN or infinite activations in module {n!r}.")
            caps.append(DenseCap(n, {n: a[:, None, :]}, {n: (a.shape[1],)}))
        return BlockCapture(caps, B)


def _first_tensor(o: Any) -> Tensor:
    if isinstance(o, Tensor):
        return o
    if isinstance(o, (tuple, list)) and o and isinstance(o[0], Tensor):
        return o[0]
    if hasattr(o, "last_hidden_state"):
        return o.last_hidden_state
    raise InputError(
        f"Cannot use the output of type {type(o).__name__} as an embedding; choose other modules."
    )
