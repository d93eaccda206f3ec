"""The capture package on its own: each layer rule, the factored/materialized switch, demotion to the exact
fallback, the fallback's two paths, and the rule registry. Tiny modules, float64, autograd-loop oracles."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

import tangentlens as tl
from tangentlens.capture import (
    RULES,
    BlockCapture,
    ConvRule,
    DenseCap,
    EmbeddingCap,
    EmbeddingRule,
    Fallback,
    GradientCapture,
    LinearRule,
    NormRule,
    OuterCap,
    materialize_is_cheaper,
    register_rule,
    rule_for,
)
from tangentlens.errors import UnsupportedLayerError, UnsupportedLayerWarning

from .models import SequenceFirst
from .oracles import jacobians


def one_hot(logits: Tensor, y: Tensor | None) -> Tensor:
    """Probes (B, C, C): one per logit, so the captured gradients are the rows of each Jacobian."""
    B, C = logits.shape
    return torch.eye(C, dtype=logits.dtype, device=logits.device).expand(B, C, C)


def capture(model: nn.Module, x: Tensor, **options: object) -> tuple[GradientCapture, BlockCapture, Tensor]:
    """One block captured with one-hot probes: the capturer, its capture, and J (B, C, P) read from it."""
    params = dict(model.named_parameters())
    with GradientCapture(model, params, one_hot, **options) as gc:  # type: ignore[arg-type]
        cap = gc.capture(x, None)
    grads: dict[str, Tensor] = {}
    for c in cap.caps:
        grads.update(c.materialize())
    return gc, cap, torch.cat([grads[n] for n in params], 2)


@pytest.fixture
def no_fallback_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedLayerWarning)
        yield


def built(*layers: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*layers).double().eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # non-trivial running statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    for p in model.parameters():  # affine parameters away from their 1/0 initialization
        p.data.add_(0.1 * torch.randn_like(p))
    return model


# Each registered layer in a tiny network, with its input: every parameter is covered by a rule.
LAYERS: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    "linear": lambda: (built(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(6, 4)),
    "linear-positions": lambda: (
        built(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)), torch.randn(6, 3, 4)
    ),
    "conv1d": lambda: (
        built(nn.Conv1d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)),
        torch.randn(6, 2, 8),
    ),
    "conv1d-valid": lambda: (
        built(nn.Conv1d(2, 3, 3, padding="valid", dilation=2), nn.Flatten(), nn.Linear(12, 3)),
        torch.randn(6, 2, 8),
    ),
    "conv2d": lambda: (
        built(nn.Conv2d(2, 3, 3, padding=1, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)),
        torch.randn(6, 2, 6, 6),
    ),
    "conv2d-valid": lambda: (
        built(nn.Conv2d(2, 3, 2, padding="valid", padding_mode="reflect"), nn.Flatten(), nn.Linear(27, 3)),
        torch.randn(6, 2, 4, 4),
    ),
    "embedding": lambda: (
        built(nn.Embedding(7, 4, padding_idx=0), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)),
        torch.tensor([[1, 2, 2], [0, 3, 6], [5, 5, 5], [0, 0, 1], [4, 2, 0], [6, 1, 3]]),
    ),
    "layernorm": lambda: (
        built(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(6, 4)
    ),
    "layernorm-positions": lambda: (
        built(nn.LayerNorm((3, 4)), nn.Flatten(), nn.Linear(24, 3)), torch.randn(6, 2, 3, 4)
    ),
    "batchnorm1d": lambda: (
        built(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(6, 4)
    ),
    "batchnorm2d": lambda: (
        built(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)),
        torch.randn(6, 1, 4, 4),
    ),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_rule_gradients_equal_an_autograd_loop(layer: str, no_fallback_warning: None) -> None:
    model, x = LAYERS[layer]()
    x = x.double() if x.is_floating_point() else x
    gc, _, J = capture(model, x)
    assert gc.fallback_names == []
    torch.testing.assert_close(J, jacobians(model, x), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Factored or materialized
# --------------------------------------------------------------------------------------------------


def positions_model() -> nn.Module:
    """A Linear(8, 8) applied at every position of (B, T, 8), then pooled to 2 logits."""

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.lin(x)).mean(1))

    torch.manual_seed(0)
    return Pooled().double().eval()


@pytest.mark.parametrize("T,cheaper", [(1, False), (2, False), (3, True)])
def test_layer_materializes_exactly_when_the_cost_rule_says_cheaper(T: int, cheaper: bool) -> None:
    # per pair of examples: factored T²(d_in + M·d_out) = T²·24, materialized M·d_in·d_out = 128
    assert materialize_is_cheaper(T, 8, 8, 2) == cheaper
    model = positions_model()
    x = torch.randn(5, T, 8, dtype=torch.float64)
    gc, cap, J = capture(model, x)
    lin = cap.caps[[r.group for r in gc.rules].index("lin")]
    assert isinstance(lin, DenseCap if cheaper else OuterCap)
    torch.testing.assert_close(J, jacobians(model, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("full", [False, True])
def test_factored_and_materialized_captures_give_the_same_gram(T: int, full: bool) -> None:
    model = positions_model()
    x1, x2 = torch.randn(5, T, 8, dtype=torch.float64), torch.randn(3, T, 8, dtype=torch.float64)
    _, c1, _ = capture(model, x1, keep_factors=True)  # never materialized
    _, c2, _ = capture(model, x2, keep_factors=True)
    for a, b in zip(c1.caps, c2.caps):
        assert isinstance(a, OuterCap) and isinstance(b, OuterCap)
        torch.testing.assert_close(a.gram(b, full), a.to_dense().gram(b.to_dense(), full))
        torch.testing.assert_close(a.sqnorms(), a.to_dense().sqnorms())


@pytest.mark.parametrize("full", [False, True])
def test_factored_embedding_gram_equals_the_materialized_table_gradient(full: bool) -> None:
    model, ids = LAYERS["embedding"]()
    _, c1, _ = capture(model, ids)
    _, c2, _ = capture(model, ids[:4].flip(1))
    a, b = c1.caps[0], c2.caps[0]
    assert isinstance(a, EmbeddingCap) and isinstance(b, EmbeddingCap)
    da, db = DenseCap(a.group, a.materialize()), DenseCap(b.group, b.materialize())
    torch.testing.assert_close(a.gram(b, full), da.gram(db, full))
    torch.testing.assert_close(a.sqnorms(), da.sqnorms())


# --------------------------------------------------------------------------------------------------
# Demotion to the fallback after the first-block checks
# --------------------------------------------------------------------------------------------------



class Tied(nn.Module):
    """The embedding table is also the output layer's weight: its rule sees only half of the gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(ids))).mean(1)
        return nn.functional.linear(h, self.emb.weight)


DEMOTED = {
    # L = 5 ≠ 4 examples: the hook sees a misaligned call
    "sequence-first": (SequenceFirst, lambda: torch.randn(4, 5, 2), "mix", "not called batch-first"),
    # L = 4 = 4 examples: looks batch-first; only the randomly weighted per-example check sees it
    "sequence-first-aligned": (SequenceFirst, lambda: torch.randn(4, 4, 2), "mix", "disagree"),
    "weight-tying": (Tied, lambda: torch.randint(0, 7, (5, 3)), "emb", "disagree"),
}


@pytest.mark.parametrize("case", list(DEMOTED))
def test_failed_check_demotes_the_layer_to_the_exact_fallback(case: str) -> None:
    make, inputs, layer, why = DEMOTED[case]
    model = make().double().eval()
    x = inputs()
    x = x.double() if x.is_floating_point() else x
    with pytest.warns(UnsupportedLayerWarning, match=why) as rec:
        gc, cap, J = capture(model, x)
    assert any(layer in str(w.message) for w in rec)
    assert layer not in [r.group for r in gc.rules]
    assert f"{layer}.weight" in gc.fallback_names and cap.caps[-1].group == "<fallback>"
    torch.testing.assert_close(J, jacobians(model, x), rtol=1e-10, atol=1e-12)


def test_hooks_only_implementation_refuses_the_demotion() -> None:
    model = SequenceFirst().double().eval()
    with pytest.raises(UnsupportedLayerError, match="mix"):
        capture(model, torch.randn(4, 5, 2, dtype=torch.float64), implementation="hooks")


class MaybeTied(nn.Module):
    """``tie`` (a plain flag) makes the output layer reuse the embedding table, as :class:`Tied` does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.tie = False

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(ids))).mean(1)
        return nn.functional.linear(h, self.emb.weight) if self.tie else self.out(h)


def checks_run(model: nn.Module, x: Tensor, **options: object) -> int:
    """How many times one kernel call's first-block check differentiates down to the parameters (the
    capture's own backward stops at the module outputs; only the check's reaches a weight)."""
    seen = []
    handle = model.mix.weight.register_hook(lambda g: seen.append(1))  # type: ignore[union-attr]
    try:
        K = tl.kernel(model, x, kind="trntk0", **options)
    finally:
        handle.remove()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    J = jacobians(model, x, names)
    torch.testing.assert_close(K, torch.einsum("icp,jcp->ij", J, J), rtol=1e-10, atol=1e-12)
    return len(seen)


def test_first_block_checks_run_once_per_model_and_input_layout() -> None:
    model = MaybeTied().double().eval()
    ids = torch.randint(0, 7, (5, 3))
    assert checks_run(model, ids) == 1
    assert checks_run(model, ids) == 0  # the same model and layout: the outcome is replayed
    assert checks_run(model, torch.randint(0, 7, (5, 4))) == 1  # another sequence length
    assert checks_run(model, ids, implementation="hooks") == 1
    assert checks_run(MaybeTied().double().eval(), ids) == 1  # another model object


@pytest.mark.filterwarnings("ignore:These modules were never called")  # ``out``, unused while tied
def test_a_changed_model_is_checked_again_and_its_demotion_replayed() -> None:
    model = MaybeTied().double().eval()
    ids = torch.randint(0, 7, (5, 3))
    assert checks_run(model, ids) == 1
    model.tie = True  # a flag the forward reads: the embedding's rule now sees half of its gradient
    with pytest.warns(UnsupportedLayerWarning, match="disagree"):
        assert checks_run(model, ids) == 1
    with pytest.warns(UnsupportedLayerWarning, match="disagree"):  # replayed: demoted and said again
        assert checks_run(model, ids) == 0
    model.tie = False
    model.mix = nn.Linear(4, 4).double()  # a replaced submodule
    assert checks_run(model, ids) == 1


# --------------------------------------------------------------------------------------------------
# The fallback: vmap of vjp, or a per-example loop
# --------------------------------------------------------------------------------------------------


class Gated(nn.Module):
    """A custom layer (no rule); with ``branch`` its forward branches on the data, which vmap cannot trace."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.branch = branch
        self.lin = nn.Linear(4, 3)
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        if self.branch and bool(x.sum() > 0):
            return h * self.w
        return h * self.w.exp()


def fallback_gradients(model: nn.Module, x: Tensor, loop: bool = False) -> tuple[Fallback, Tensor]:
    params = dict(model.named_parameters())
    fb = Fallback(model, params)
    fb.use_loop = loop
    V = one_hot(model(x), None)
    cap = fb(x, V)
    return fb, torch.cat([cap.grads[n] for n in params], 2)


def test_fallback_loop_equals_vmap_and_autograd() -> None:
    model = Gated(branch=False).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedLayerWarning)
        fb, vmapped = fallback_gradients(model, x)
    _, looped = fallback_gradients(model, x, loop=True)
    assert not fb.use_loop
    torch.testing.assert_close(looped, vmapped, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(vmapped, jacobians(model, x), rtol=1e-10, atol=1e-12)


def test_fallback_uses_the_loop_when_vmap_cannot_trace() -> None:
    model = Gated(branch=True).double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)  # examples on both sides of the branch
    with pytest.warns(UnsupportedLayerWarning, match="vmap could not trace"):
        fb, J = fallback_gradients(model, x)
    assert fb.use_loop
    torch.testing.assert_close(J, jacobians(model, x), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# The rule registry
# --------------------------------------------------------------------------------------------------


class KeepsForward(nn.Linear):
    pass


class OwnForward(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


class SubEmbedding(nn.Embedding):
    pass


@pytest.mark.parametrize(
    "module,rule",
    [
        (nn.Linear(2, 3), LinearRule),
        (KeepsForward(2, 3), LinearRule),
        (nn.Conv1d(2, 3, 3, padding=1), ConvRule),
        (nn.Conv2d(2, 3, 3, padding="valid"), ConvRule),
        (nn.Embedding(5, 2, padding_idx=0), EmbeddingRule),
        (nn.LayerNorm(4), NormRule),
        (nn.BatchNorm2d(3), NormRule),
    ],
)
def test_registry_gives_the_rule_of_a_module_type(module: nn.Module, rule: type) -> None:
    assert rule_for(module) is rule
    assert RULES[next(t for t in type(module).__mro__ if t in RULES)] is rule


@pytest.mark.parametrize(
    "module",
    [
        OwnForward(2, 3),  # a subclass with its own forward
        SubEmbedding(5, 2),  # embeddings: the exact type only
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(2, 3, 3, padding="same"),
        nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"),
        nn.Conv3d(2, 3, 3),
        nn.Embedding(5, 2, max_norm=1.0),
        nn.Embedding(5, 2, scale_grad_by_freq=True),
        nn.LayerNorm(4, elementwise_affine=False),
        nn.BatchNorm1d(3, track_running_stats=False),
        nn.GroupNorm(1, 4),
    ],
)
def test_registry_has_no_rule_for_uncovered_modules(module: nn.Module) -> None:
    assert rule_for(module) is None


def test_unregistered_parametrized_layer_goes_to_the_fallback() -> None:
    model = built(nn.Linear(4, 4), nn.GroupNorm(2, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.warns(UnsupportedLayerWarning, match="No fast exact rule"):
        gc, cap, J = capture(model, x)
    assert gc.fallback_names == ["1.weight", "1.bias"]
    assert [r.group for r in gc.rules] == ["0", "3"] and cap.caps[-1].group == "<fallback>"
    torch.testing.assert_close(J, jacobians(model, x), rtol=1e-10, atol=1e-12)


def test_registered_rule_covers_a_new_module_type(no_fallback_warning: None) -> None:
    class Affine(nn.Module):  # a Linear of its own: y = x Wᵀ + b
        def __init__(self, d_in: int, d_out: int) -> None:
            super().__init__()
            self.out_features = d_out
            self.weight = nn.Parameter(torch.randn(d_out, d_in))
            self.bias = nn.Parameter(torch.randn(d_out))

        def forward(self, x: Tensor) -> Tensor:
            return x @ self.weight.T + self.bias

    assert rule_for(Affine(2, 2)) is None
    register_rule(Affine)(LinearRule)
    try:
        assert rule_for(Affine(2, 2)) is LinearRule
        model = built(Affine(4, 5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(5, 4, dtype=torch.float64)
        gc, _, J = capture(model, x)
        assert gc.fallback_names == []
        torch.testing.assert_close(J, jacobians(model, x), rtol=1e-10, atol=1e-12)
    finally:
        del RULES[Affine]
