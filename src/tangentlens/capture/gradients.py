"""The gradient capturer: sets up the layer rules, checks them on the first block, captures blocks.

One block costs one batched forward and one batched backward per output probe (straight to the hooked
modules' outputs, no weight gradients), plus the fallback's vector-Jacobian products. The first block of a
call also runs the checks that make the result exact whatever the model does:

* a rule whose module is called on an input that is not batch-first (unbatched, sequence-first), or never
  through its ``forward``, is demoted to the fallback;
* a broadcast call (batch 1 in a block of B > 1) is expanded to the block's batch, and demoted if that
  expansion changes the network's logits;
* a randomly weighted sum over examples of the hook-based gradients, Σ_i w_i g_i, is compared with
  autograd's gradient of Σ_i w_i v_i·f(x_i) (one extra backward); a disagreeing rule (weight tying, a
  batch laid out elsewhere) is demoted.

The checks' outcome (which rules were demoted, and why) is remembered per model object, under a structure
key — every submodule's identity, type, plain attributes (flags such as ``training``), own ``forward`` and
installed hooks; the selected parameters' and the buffers' identities and shapes — and the first block's
input layout (shapes, dtypes, devices). A later call with the same key replays the demotions instead of
repeating the checks, so repeated small calls do not pay the extra backward (``verify=False`` neither reads
nor records the outcome). Within a call the first block's checks stand for every later block; across calls
they stand for every call whose model and layout have the same key.

Demotions warn (:class:`~tangentlens.errors.UnsupportedLayerWarning`), or raise with
``implementation="hooks"``.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, NonFiniteError, UnsupportedLayerError, UnsupportedLayerWarning
from ..inputs import Batch, batch_size_of, slice_batch
from ..kinds import IMPLEMENTATIONS
from ..network import call_model, extract_logits
from .caps import BlockCapture, Cap, OuterCap
from .fallback import Fallback
from .plan import CapturePlan, plan_blocks, rule_cost
from .rules import OuterRule, Rule, rule_for

_DENSE = (nn.Linear, nn.Embedding, nn.LayerNorm)

ProbeFn = Callable[[Tensor, "Tensor | None"], Tensor]
"""Maps detached logits (B, C) and labels (B,) or None to probe vectors (B, M, C)."""


# model -> {structure and input layout: the demotions of its first-block checks, in order}
_CHECKED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, list[tuple[frozenset[str], str]]]] = (
    weakref.WeakKeyDictionary()
)


def _structure(model: nn.Module, params: dict[str, nn.Parameter], implementation: str) -> Hashable:
    """What of a model the first-block checks depend on (see the module docstring); computed before the
    capturer installs its own hooks."""
    mods = []
    for name, m in model.named_modules():
        own = m.__dict__
        flags = tuple((k, v) for k, v in own.items() if v is None or isinstance(v, (bool, int, float, str)))
        forward = own.get("forward")
        mods.append((name, id(m), type(m), flags, None if forward is None else id(forward),
                     tuple(m._forward_hooks), tuple(m._forward_pre_hooks)))
    bufs = tuple((n, id(b), tuple(b.shape)) for n, b in model.named_buffers())
    return implementation, tuple(mods), tuple((n, id(p)) for n, p in params.items()), bufs


def _layout(x: Batch) -> Hashable:
    """What of a block the first-block checks depend on: each tensor's shape, dtype and device; the values
    of plain arguments, and the identity of other objects, in a dict batch."""

    def sig(v: Any) -> Hashable:
        if isinstance(v, Tensor):
            return (tuple(v.shape), v.dtype, v.device)
        if v is None or isinstance(v, (bool, int, float, str)):
            return (type(v).__name__, v)
        return (type(v).__qualname__, id(v))

    if isinstance(x, Tensor):
        return sig(x)
    return tuple(sorted((str(k), sig(v)) for k, v in x.items()))


_EXPANSION_FAILED = (
    "These modules are called on inputs shared by the whole batch (batch dimension 1), and giving each "
    "example its own copy of their output changes the network's result"
)


def _check_weights(B: int, like: Tensor) -> Tensor:
    """Per-example weights of the first-block check: fixed pseudo-random values in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(0x7A6E)
    return (0.5 + torch.rand(B, generator=g, dtype=torch.float64)).to(like.device, like.dtype)


class GradientCapture:
    """Captures compact per-example gradients of ``params`` for blocks of examples.

    Args:
        model: a prepared model (eval mode, final device and dtype).
        params: the selected parameters ``{name: parameter}`` of ``model``.
        probe_fn: builds the probe vectors (B, M, C) from logits and labels.
        verify: check hook-based gradients against autograd on the first block (recommended).
        keep_factors: never materialize factored (Linear/Conv) captures, e.g. for Kronecker projections.
        implementation: "auto" (layer rules where they apply and are verified, the ``torch.func``
            fallback elsewhere), "hooks" (layer rules only: a parameter that would need the fallback is an
            :class:`UnsupportedLayerError`) or "functional" (every parameter through the fallback — the
            independent implementation the rules are cross-checked against).

    Attributes:
        rules: the layer rules in use (one per covered module; demoted rules are removed).
        fallback_names: the parameters captured by the fallback, in ``params`` order.

    Use as a context manager; hooks are removed on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        probe_fn: ProbeFn,
        verify: bool = True,
        keep_factors: bool = False,
        implementation: str = "auto",
    ) -> None:
        if implementation not in IMPLEMENTATIONS:
            raise InputError(
                f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}."
            )
        self.model = model
        self.params = params
        self.probe_fn = probe_fn
        self.verify = verify
        self.implementation = implementation
        self.rules: list[Rule] = []
        self.fallback_names: list[str] = []
        self._checked = False
        self._fallback: Fallback | None = None
        self._measure = False  # record the bytes the forward saves for backward (planning)
        self._saved: dict[int, int] = {}  # storage address -> bytes, per-example activations only
        self._structure = _structure(model, params, implementation) if verify else None
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._param_ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        by_id = {id(p): n for n, p in params.items()}
        covered: set[str] = set()
        for mname, mod in model.named_modules() if implementation != "functional" else ():
            own = {r: p for r, p in mod._parameters.items() if p is not None and id(p) in by_id}
            if not own:
                continue
            cls = rule_for(mod)
            if cls is None or not set(own) <= {"weight", "bias"}:
                continue
            names = {r: by_id[id(p)] for r, p in own.items()}
            if any(n in covered for n in names.values()):
                continue  # shared module used twice in the tree: first one wins
            rule = cls(mname or "<root>", mod, names)
            rule.allow_dense = not keep_factors
            self.rules.append(rule)
            covered.update(names.values())
        self.fallback_names = [n for n in params if n not in covered]
        # one vmapped backward for all probes (instead of one backward per probe) where every parametrized
        # layer is dense (Linear / Embedding / LayerNorm): it saves the per-call overhead of M - 1 backward
        # passes; convolution and pooling backward run slower under vmap, so those models keep the loop.
        # Switched off for good if vmap has no batching rule for an op of the model (it warns).
        self.batched_probes = bool(self.rules) and all(isinstance(r.module, _DENSE) for r in self.rules)
        self._demotions: list[tuple[frozenset[str], str]] = []
        self._record: Hashable | None = None  # the key the first block's checks are recorded under
        self._warned = implementation == "functional"  # the fallback was asked for: nothing to warn about

    def __enter__(self) -> GradientCapture:
        return self

    def __exit__(self, *exc: Any) -> None:
        for r in self.rules:
            r.remove()

    def _demote(self, rules: list[Rule], why: str) -> None:
        if not rules:
            return
        names = [n for r in rules for n in r.params()]
        self._demotions.append((frozenset(r.group for r in rules), why))
        if self.implementation == "hooks":
            raise UnsupportedLayerError(
                f"{why}: {', '.join(r.group for r in rules)}. With implementation='hooks' their parameters "
                f"({names[:6]}) cannot use the torch.func fallback: pass implementation='auto', or exclude "
                "them with parameters=..."
            )
        warnings.warn(
            f"{why}: {', '.join(r.group for r in rules)}. Their parameters ({len(names)}) use the "
            "per-example torch.func fallback (exact, slower).",
            UnsupportedLayerWarning,
            stacklevel=4,
        )
        for r in rules:
            r.remove()
            self.rules.remove(r)
        keep = set(self.fallback_names) | set(names)
        self.fallback_names = [n for n in self.params if n in keep]
        self._fallback = None

    def _warn_unsupported(self) -> None:
        warned, self._warned = self._warned, True
        if self.fallback_names and self.implementation == "hooks":
            raise UnsupportedLayerError(
                f"No layer rule covers parameters {self.fallback_names[:6]}; with implementation='hooks' "
                "they cannot use the torch.func fallback: pass implementation='auto', or exclude them with "
                "parameters=..."
            )
        if self.fallback_names and not warned:
            warnings.warn(
                "No fast exact rule for parameters "
                f"{self.fallback_names[:6]}{' ...' if len(self.fallback_names) > 6 else ''}; "
                "they use the per-example torch.func fallback (exact, slower).",
                UnsupportedLayerWarning,
                stacklevel=4,
            )

    def capture(self, x: Batch, y: Tensor | None) -> BlockCapture:
        """Capture one block: one forward, one backward per probe (+ the fallback's vjps).

        Args:
            x: the block's inputs (B examples), on the model's device and dtype.
            y: the block's labels (B,), or None.

        Returns:
            One capture per layer rule (in ``rules`` order), then the fallback's, if any.

        Raises:
            NonFiniteError: the model's logits are NaN or infinite.
            UnsupportedLayerError: a layer needs the fallback with ``implementation="hooks"``, or a layer
                checked on the first block is called misaligned on a later one.
        """
        first = not self._checked
        if first:
            self._warn_unsupported()
            if self.verify and self._record is None:
                self._record = (self._structure, _layout(x))
                known = _CHECKED.get(self.model, {}).get(self._record)
                if known is not None:  # this model and layout were checked by an earlier call
                    self._record = None
                    for groups, why in known:
                        self._demote([r for r in self.rules if r.group in groups], why)
                    self._checked = True
                    first = False
        B = batch_size_of(x)
        for r in self.rules:
            r.reset()
            r.batch = B
            r.active = True
        self._saved.clear()
        try:
            with self._measuring():
                logits = extract_logits(call_model(self.model, x), B)
        except Exception:
            expanded = [r for r in self.rules if r.expanded]
            for r in self.rules:
                r.active = False
            if first and expanded:
                # expanding a broadcast output broke the forward: those rules use the fallback
                self._demote(self._bad_expansions(x, expanded, None), _EXPANSION_FAILED)
                return self.capture(x, y)
            raise
        for r in self.rules:
            r.active = False
        if not torch.isfinite(logits).all():
            raise NonFiniteError(
                "The model produced NaN or infinite logits; check the inputs (NaN pixels?) and the weights."
            )
        misaligned = [r for r in self.rules if r.misaligned is not None]
        if misaligned:
            if not first:
                r = misaligned[0]
                raise UnsupportedLayerError(
                    f"Module {r.group!r} was {r.misaligned}, although on the first block its calls carried "
                    "the batch as their first dimension, so its per-example gradients cannot be attributed. "
                    f"Exclude its parameters with parameters=... or make its inputs batch-first."
                )
            self._demote(misaligned, "These modules are not called batch-first (their input's first "
                         "dimension is not the block's examples)")
            return self.capture(x, y)
        if first:
            silent = [r for r in self.rules if not r.fired]
            if silent:
                self._demote(silent, "These modules were never called through their forward()")
            expanded = [r for r in self.rules if r.expanded]
            bad = self._bad_expansions(x, expanded, logits) if expanded else []
            if bad:
                self._demote(bad, _EXPANSION_FAILED)
                return self.capture(x, y)
        V = self.probe_fn(logits.detach(), y)
        M = V.shape[1]
        outs = [o for r in self.rules for o in r.outs]
        grads = self._output_grads(logits, outs, V) if outs and logits.requires_grad else [None] * len(outs)
        k = 0
        for r in self.rules:
            r.grads = grads[k : k + len(r.outs)]
            k += len(r.outs)
        check: dict[str, Tensor] | None = None
        w = _check_weights(B, logits) if first else None
        if first and self.verify and outs and logits.requires_grad:
            # autograd's gradient of Σ_i w_i v_i·f(x_i): random per-example weights make a capture that
            # credits the wrong example (a broadcast input, a batch laid out elsewhere) disagree
            names = [n for r in self.rules for n in r.params()]
            gs = torch.autograd.grad(
                logits, [self.params[n] for n in names], V[:, 0] * w[:, None], allow_unused=True
            )
            check = {n: (torch.zeros_like(self.params[n]) if g is None else g) for n, g in zip(names, gs)}
        del outs
        caps: list[Cap] = [r.finalize(M) for r in self.rules]
        for r in self.rules:
            r.reset()
        if check is not None:
            self._checked = True
            assert w is not None
            bad = self._verify(caps, check, w)
            if bad:
                self._demote(bad, "Hook-based per-example gradients disagree with autograd (a parameter used "
                             "outside its module, e.g. weight tying, or a batch laid out elsewhere)")
                return self.capture(x, y)
        self._checked = True
        if self._record is not None:
            _CHECKED.setdefault(self.model, {})[self._record] = list(self._demotions)
            self._record = None
        if self.fallback_names:
            if self._fallback is None:
                self._fallback = Fallback(self.model, {n: self.params[n] for n in self.fallback_names})
            caps.append(self._fallback(x, V))
        return BlockCapture(caps, B)

    def _bad_expansions(self, x: Batch, expanded: list[Rule], logits: Tensor | None) -> list[Rule]:
        """The rules whose expanded broadcast output changes the network's logits (first block only).

        ``logits``: the forward with every rule expanding (None if it raised). If they equal the plain
        model's, no rule is bad; otherwise each expanded rule is tried alone (one forward each).
        """
        B = batch_size_of(x)
        with torch.no_grad():
            plain = extract_logits(call_model(self.model, x), B)
        tol = (1e-10 if plain.dtype == torch.float64 else 1e-4) * (float(plain.abs().max()) + 1)

        def same(out: Tensor | None) -> bool:
            return out is not None and out.shape == plain.shape and float((plain - out).abs().max()) <= tol

        if same(None if logits is None else logits.detach()):
            return []
        bad = []
        for only in expanded:
            for r in self.rules:
                r.reset()
                r.expand = r is only
                r.active = True
            try:
                out: Tensor | None = extract_logits(call_model(self.model, x), B).detach()
            except Exception:  # noqa: BLE001 - an expansion that breaks the forward is a wrong one
                out = None
            finally:
                for r in self.rules:
                    r.reset()
                    r.expand = True
                    r.active = False
            if not same(out):
                bad.append(only)
        return bad or expanded

    def _output_grads(self, logits: Tensor, outs: list[Tensor], V: Tensor) -> list[Tensor | None]:
        """Per recorded module output, the gradients of Σ_i V[i, m]·f(x_i) for every probe m, stacked as
        (B, M, *output shape), detached (straight to the outputs: no weight gradients); None where no probe
        reaches the output. One vmapped backward for all probes when ``batched_probes``, else one backward
        per probe."""
        M = V.shape[1]
        if self.batched_probes and M > 1:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                try:
                    gs = torch.autograd.grad(logits, outs, V.transpose(0, 1), retain_graph=True,
                                             allow_unused=True, is_grads_batched=True)
                except RuntimeError:  # an op without a batching rule: per-probe passes from now on
                    gs = None
            slow = [w for w in said if "performance drop" in str(w.message)]
            for w in said:  # the model's own warnings pass through
                if w not in slow:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            if gs is None or slow:
                self.batched_probes = False
            if gs is not None:  # (M, B, ...) -> (B, M, ...)
                return [None if g is None else g.detach().transpose(0, 1).contiguous() for g in gs]
        per_probe = [torch.autograd.grad(logits, outs, V[:, m], retain_graph=True, allow_unused=True)
                     for m in range(M)]
        stacked: list[Tensor | None] = []
        for j in range(len(outs)):
            got = [p[j] for p in per_probe]
            if all(g is None for g in got):
                stacked.append(None)
            else:
                stacked.append(torch.stack([torch.zeros_like(outs[j]) if g is None else g.detach()
                                            for g in got], 1))
        return stacked

    def _verify(self, caps: list[Cap], ref: dict[str, Tensor], w: Tensor) -> list[Rule]:
        """The rules whose weighted batch sum Σ_i w_i g_i (probe 0) differs from autograd's ``ref``."""
        dtype = next((v.dtype for v in ref.values() if v is not None), torch.float32)
        tol = 1e-8 if dtype == torch.float64 else 1e-3
        owner: list[Rule] = []
        got: list[Tensor] = []
        want: list[Tensor] = []
        for rule, cap in zip(self.rules, caps):
            for n, s in cap.batch_sum(0, w).items():
                owner.append(rule)
                got.append(s)
                want.append(ref[n])
        if not got:
            return []
        # all norms in three fused calls (one read-back): ‖s − r‖, ‖s‖, ‖r‖ per parameter
        diff = [s - r for s, r in zip(got, want)]
        d, s_n, r_n = (torch.stack(torch._foreach_norm(t)).tolist() for t in (diff, got, want))
        # a gradient that is zero up to rounding (e.g. an attention key bias, exactly shift-invariant) must
        # not be flagged: differences are also judged against the largest gradient of the block
        floor = 1e-3 * tol * max(r_n)
        bad: list[Rule] = []
        for rule, e, a, b in zip(owner, d, s_n, r_n):
            if e > tol * (a + b) + floor and rule not in bad:
                bad.append(rule)
        return bad

    def _measuring(self) -> Any:
        if not self._measure:
            return contextlib.nullcontext()

        def pack(t: Tensor) -> Tensor:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self._param_ptrs:  # weights are saved too, but are not per-example memory
                # the bytes the saved view spans, not its whole storage: a block sliced from a large
                # input tensor (x[:4] of 20,000 examples) shares that tensor's storage
                span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) if t.numel() else 0
                size = min(span * t.element_size(), st.nbytes())
                self._saved[ptr] = max(self._saved.get(ptr, 0), size)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def plan(
        self,
        x: Batch,
        y: Tensor | None,
        *,
        limit: int,
        n_cache: int,
        cache_budget: int,
        work_budget: int,
        materialize: str = "chosen",
        trial: int = 4,
    ) -> CapturePlan:
        """Choose the examples per capture and which layers to materialize, from one memory budget.

        Captures a trial slice of at most ``trial`` examples of the first block (which also runs the
        first-block checks), measures per example: the activations the forward saves for backward, the
        compact captures of every layer, the materialized gradients and the fallback's gradients
        (:func:`~.plan.rule_cost`); then :func:`~.plan.plan_blocks`

        * materializes a Linear/Conv layer with T > 1 positions (weight gradient Σ_t δ_t a_tᵀ) only where
          the factored Gram is over ``DENSE_ADVANTAGE`` times more work per pair,
          T²(d_in + M d_out) > 4 M d_in d_out, *and* the captures of ``n_cache`` examples still fit
          ``cache_budget`` (layers with the largest materialized size are dropped first);
        * takes the largest block s ≤ ``limit`` with s·w + s²·g ≤ ``work_budget`` and s²·g ≤
          ``GRAM_TILE_BYTES``.

        ``materialize``: "chosen" (kernels), "all" (flat features: every gradient is materialized) or
        "kronecker" (Kronecker-projected features: Linear/Conv factors stay, other layers materialize).
        Cost: one capture of the trial slice. The decisions hold for every later block of the call. When
        the slice is the whole block and the plan keeps it whole, that capture is returned in the plan
        (``capture``) to be used as the block's own, so small calls capture nothing twice.
        """
        B = batch_size_of(x)
        b0 = min(B, trial)
        xs = slice_batch(x, 0, b0)
        ys = None if y is None else y[:b0]
        for r in self.rules:
            r.dense = False
        self._measure = True
        try:
            cap = self.capture(xs, ys)
        finally:
            self._measure = False
        graph = sum(self._saved.values()) / b0
        self._saved.clear()
        costs = [rule_cost(r, c, b0, materialize) for r, c in zip(self.rules, cap.caps)]
        fallback = cap.caps[-1].nbytes() / b0 if len(cap.caps) > len(self.rules) else 0.0
        plan, chosen = plan_blocks(
            costs, fallback, graph, limit=limit, n_cache=n_cache, cache_budget=cache_budget,
            work_budget=work_budget, materialize=materialize,
        )
        for r in self.rules:
            if isinstance(r, OuterRule):
                r.dense = r in chosen
        if b0 == B and plan.block >= B:
            caps = [c.to_dense() if isinstance(c, OuterCap) and r.dense else c
                    for r, c in zip(self.rules, cap.caps)]
            plan.capture = BlockCapture(caps + cap.caps[len(self.rules):], B)
        return plan
