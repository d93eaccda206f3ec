"""Bad input gets a typed exception that says what to change; fallbacks warn instead of failing."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tangentlens as tl
import tangentlens.memory as memory
from tangentlens import Projection
from tangentlens.errors import (
    DeviceError,
    InputError,
    MemoryBudgetError,
    ModelCallError,
    ModelOutputError,
    NonFiniteError,
    ParameterSelectionError,
    UnknownKindError,
    UnsupportedLayerWarning,
)

from .oracles import oracle_kernel


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))


def test_unknown_kind(mlp: nn.Module) -> None:
    with pytest.raises(UnknownKindError, match="choose one of"):
        tl.kernel(mlp, X, kind="ntk")


def test_iter_features_checks_arguments_at_the_call(mlp: nn.Module) -> None:
    # a bad argument surfaces where iter_features is called, not where its blocks are first read
    with pytest.raises(UnknownKindError):
        tl.iter_features(mlp, X, kind="ntk")
    with pytest.raises(InputError, match="batch_size"):
        tl.iter_features(mlp, X, batch_size=0)
    blocks = list(tl.iter_features(mlp, X, batch_size=4))
    assert [s for s, _ in blocks] == [0, 4]
    assert torch.equal(torch.cat([b for _, b in blocks]), tl.features(mlp, X, batch_size=4))


def test_output_not_2d() -> None:
    m = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    with pytest.raises(ModelOutputError, match=r"\(B, 1\)"):
        tl.kernel(m, X)


def test_probabilities_rejected() -> None:
    m = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1))
    with pytest.raises(ModelOutputError, match="remove the final softmax"):
        tl.kernel(m, X)


def test_wrong_row_count() -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l(x)[:1]

    with pytest.raises(ModelOutputError, match="one row of logits per example"):
        tl.kernel(Bad(), X)


def test_empty_and_mismatched(mlp: nn.Module) -> None:
    with pytest.raises(InputError, match="empty"):
        tl.kernel(mlp, X[:0])
    with pytest.raises(InputError, match="one label per example"):
        tl.kernel(mlp, (X, torch.zeros(5)))
    with pytest.raises(InputError, match="one label per example"):
        tl.kernel(mlp, X, kind="gradcos", labels=torch.zeros(2))
    with pytest.raises(InputError, match="batch_size"):
        tl.kernel(mlp, X, batch_size=0)
    with pytest.raises(InputError, match="Unsupported"):
        tl.kernel(mlp, "not data")


def test_nan_inputs(mlp: nn.Module) -> None:
    bad = X.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        tl.kernel(mlp, bad)


def test_nan_gradients() -> None:
    class Sqrt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.l(x)
            return torch.sqrt(h.abs() * 0)  # finite outputs, infinite gradients at 0

    with pytest.raises(NonFiniteError):
        tl.kernel(Sqrt(), X)


def test_gradcos_needs_labels(mlp: nn.Module) -> None:
    with pytest.raises(InputError, match="needs labels"):
        tl.kernel(mlp, X, kind="gradcos")
    with pytest.raises(InputError, match=r"lie in \[0, 2\]"):
        tl.kernel(mlp, X, kind="gradcos", labels=torch.full((6,), 7))
    with pytest.raises(InputError, match="predicted"):
        tl.kernel(mlp, X, kind="gradcos", labels="guess")


def test_parameters_that_do_not_exist(mlp: nn.Module) -> None:
    with pytest.raises(ParameterSelectionError, match="No parameter or module named"):
        tl.kernel(mlp, X, parameters=["fc.weight"])
    with pytest.raises(ParameterSelectionError, match="does not belong"):
        tl.kernel(mlp, X, parameters=[nn.Parameter(torch.zeros(2))])


def test_shuffling_loader_rejected(mlp: nn.Module) -> None:
    dl = DataLoader(TensorDataset(X), batch_size=2, shuffle=True)
    with pytest.raises(InputError, match="shuffle=False"):
        tl.kernel(mlp, dl)


def test_probes_validation(mlp: nn.Module) -> None:
    with pytest.raises(InputError, match="output probes"):
        tl.kernel(mlp, X, probes=0)
    with pytest.raises(InputError, match="exact trace"):
        tl.kernel(mlp, X, probes=4)
    with pytest.raises(InputError, match="trace kinds"):
        tl.kernel(mlp, X, kind="entk", probes=2)
    with pytest.raises(InputError, match="seed"):
        tl.kernel(mlp, X, probes=2, probe_seed=1.5)  # type: ignore[arg-type]


def test_unsupported_layer_falls_back_with_one_warning() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), Scale(), nn.GroupNorm(1, 5), nn.Tanh(), nn.Linear(5, 2))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        k = tl.kernel(m, X, kind="trntk0", dtype=torch.float64, batch_size=2)
    msgs = [str(x.message) for x in w if issubclass(x.category, UnsupportedLayerWarning)]
    assert len(msgs) == 1 and "1.w" in msgs[0]
    assert float((k - oracle_kernel(m, X, kind="trntk0")).norm() / k.norm()) < 1e-6


# --------------------------------------------------------------------------------------------------
# Bad inputs that used to surface as raw errors (issue 12, item 7)
# --------------------------------------------------------------------------------------------------


def test_integer_inputs_for_a_float_model(mlp: nn.Module) -> None:
    xi = torch.randint(0, 3, (6, 4))
    for kind in ("trntk", "em"):  # the gradient capture and the forward-only capture call the model
        with pytest.raises(ModelCallError, match=r"x\.float\(\)") as e:
            tl.kernel(mlp, xi, kind=kind)
        assert isinstance(e.value, InputError)
        msg = str(e.value)
        assert "torch.int64" in msg and re.search(r"\((4|6), 4\)", msg)  # the block (or its first slice)
        assert "Sequential" in msg and "first layer" in msg
        assert isinstance(e.value.__cause__, RuntimeError)  # the model's own exception is chained


def test_float_inputs_for_an_embedding_model() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ModelCallError, match=r"x\.long\(\)"):
        tl.kernel(m, torch.randn(6, 3))


def test_wrong_shape_inputs(mlp: nn.Module) -> None:
    with pytest.raises(ModelCallError, match="last dimension is 4") as e:
        tl.kernel(mlp, torch.randn(6, 5))
    assert re.search(r"shape \((4|6), 5\)", str(e.value)) and "Reshape" in str(e.value)
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    with pytest.raises(ModelCallError, match=r"expects floating inputs of shape \(B, 1, H, W\)"):
        tl.features(cnn, torch.randn(6, 64))


def test_model_errors_in_the_fallback_loop_are_typed() -> None:
    """A model that fails only per example: the torch.func fallback's vmap fails, is detected (one
    warning), and its per-example loop raises the typed error."""

    class NeedsPairs(nn.Module):  # no fast rule: its parameter goes through the torch.func fallback
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] < 2:
                raise ValueError("batch statistics need at least two rows")
            return (x - x.mean(0)) * self.w

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), NeedsPairs())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(ModelCallError, match=r"shape \(1, 4\)") as e:
            tl.kernel(m, X)
    assert isinstance(e.value.__cause__, ValueError)
    assert any("vmap could not trace" in str(x.message) for x in w)


def test_library_errors_are_not_wrapped_twice(mlp: nn.Module) -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"h": x}

    m = nn.Sequential(nn.Linear(4, 4), Pair())
    m.forward = lambda x: m[1](m[0](x))["h"][:, :3]  # type: ignore[method-assign]
    # the Em hook on a module returning a dict raises the library's InputError inside the forward
    with pytest.raises(InputError, match="choose other modules") as e:
        tl.kernel(m, X, kind="em", modules=["1"])
    assert type(e.value) is InputError and e.value.__cause__ is None

    class Raising(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise NonFiniteError("raised by the user's own tangentlens-aware code")

    with pytest.raises(NonFiniteError, match="user's own"):
        tl.kernel(nn.Sequential(nn.Linear(4, 3), Raising()), X)


def test_meta_model_and_meta_device(mlp: nn.Module) -> None:
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(DeviceError, match=r"to_empty\(device='cpu'\)") as e:
        tl.kernel(meta, X)
    assert isinstance(e.value, InputError)
    with pytest.raises(DeviceError, match="to_empty"):
        tl.iter_features(meta, X)  # checked at the call
    with pytest.raises(DeviceError, match="use device='cpu'"):
        tl.kernel(mlp, X, device="meta")
    with pytest.raises(InputError, match="meta"):
        tl.kernel(mlp, torch.empty(6, 4, device="meta"))


def test_unavailable_devices(mlp: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for call in (
        lambda: tl.kernel(mlp, X, device="cuda"),
        lambda: tl.train_test_kernels(mlp, X, X, device="cuda:0"),
        lambda: tl.features(mlp, X, device=torch.device("cuda")),
        lambda: tl.iter_features(mlp, X, device="cuda"),  # at the call, not at the first block
    ):
        with pytest.raises(DeviceError, match="CUDA is not available.*use device='cpu'"):
            call()
    if hasattr(torch.backends, "mps"):
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        with pytest.raises(DeviceError, match="MPS is not available; use device='cpu'"):
            tl.kernel(mlp, X, device="mps")
    with pytest.raises(DeviceError, match="pass device='cpu'"):
        tl.kernel(mlp, X, device="gpu0")
    assert torch.equal(tl.kernel(mlp, X, device="cpu"), tl.kernel(mlp, X))


def test_huge_projection_dim_fails_before_allocating(mlp: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    for dim in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="projection dimension"):
            Projection(dim)  # type: ignore[arg-type]
    if memory.available_bytes("cpu") is not None:  # the real machine: ~440 GB of tiles and rows
        fix = "smaller projection dim.*kind='sjlt' or 'kronecker'"
        with pytest.raises(MemoryBudgetError, match=fix) as e:
            tl.kernel(mlp, X, projection=Projection(10**9, kind="rademacher"))
        assert isinstance(e.value, InputError) and isinstance(e.value, MemoryError)
        assert "nothing was allocated" in str(e.value)
        # the default kind ("khatri_rao"): its (rows, probes, K) features alone are ~72 GB
        fix = r"kind='khatri_rao'\) of 2 layers.*smaller projection dim"
        with pytest.raises(MemoryBudgetError, match=fix):
            tl.kernel(mlp, X, projection=Projection(10**9))
    # deterministic: 100 MiB free; a 2^20-dim dense projection needs ~0.5 GiB of tiles and rows
    monkeypatch.setattr(memory, "available_bytes", lambda device: 100 * 2**20)
    with pytest.raises(MemoryBudgetError, match=r"Projection\(dim=1,048,576, kind='rademacher'\)"):
        tl.features(mlp, X, projection=Projection(2**20, kind="rademacher"))
    with pytest.raises(MemoryBudgetError, match=r"Projection\(dim=8,388,608, kind='khatri_rao'\)"):
        tl.features(mlp, X, projection=Projection(2**23))  # 6 x 3 x 2^23 floats of features: 0.6 GB
    with pytest.raises(MemoryBudgetError, match="smaller projection dim") as e:
        tl.kernel(mlp, X, projection=Projection(2**23, kind="sjlt"))
    assert "kind='sjlt'" not in str(e.value).split("would need")[1]  # no advice to use what it uses
    with pytest.raises(MemoryBudgetError, match="kind='kronecker'"):  # the kronecker's own flat part
        tl.kernel(mlp, X, projection=Projection(2**23, kind="kronecker"))
    k = tl.kernel(mlp, X, projection=Projection(64, seed=3))  # small dims are unaffected
    assert torch.equal(k, tl.kernel(mlp, X, projection=Projection(64, seed=3)))


def test_all_frozen_model_needs_an_explicit_selection(mlp: nn.Module) -> None:
    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).requires_grad_(False)
    for call in (
        lambda: tl.kernel(frozen, X),
        lambda: tl.train_test_kernels(frozen, X, X[:2]),
        lambda: tl.features(frozen, X, kind="pntk"),
        lambda: tl.iter_features(frozen, X),  # at the call
    ):
        fix = r"frozen.*requires_grad_\(True\).*parameters="
        with pytest.raises(ParameterSelectionError, match=fix) as e:
            call()
        assert "unfreeze" in str(e.value).lower()
    # an explicit selection works on frozen parameters and leaves them frozen
    k = tl.kernel(frozen, X, parameters=frozen, kind="trntk0")
    k2 = tl.kernel(frozen, X, parameters=["2.weight", "2.bias"], kind="trntk0")
    assert not any(p.requires_grad for p in frozen.parameters())
    live = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    live.load_state_dict(frozen.state_dict())
    torch.testing.assert_close(k, tl.kernel(live, X, kind="trntk0"))
    torch.testing.assert_close(k2, tl.kernel(live, X, kind="trntk0", parameters=live[2]))
    # forward-only kinds select no parameters: a frozen model is fine
    tl.kernel(frozen, X, kind="ck")


_CALLS: dict[str, Any] = {
    "kernel": lambda m, **kw: tl.kernel(m, X, **kw),
    "kernel2": lambda m, **kw: tl.kernel(m, X, X[:2], **kw),
    "train_test_kernels": lambda m, **kw: tl.train_test_kernels(m, X, X[:2], **kw),
    "features": lambda m, **kw: tl.features(m, X, **kw),
    "iter_features": lambda m, **kw: tl.iter_features(m, X, **kw),  # raises at the call
}
_BAD_OPTIONS = [  # (kind, option, value, the kinds the message must name)
    ("trntk", "modules", ["0"], ["'em'"]),
    ("ck", "modules", ["0"], ["'em'"]),
    ("em", "parameters", ["0.weight"], ["'entk'", "'trntk'", "'gradcos'"]),
    ("ck", "parameters", "2", ["'pntk'"]),
    ("trntk", "labels", torch.zeros(6, dtype=torch.long), ["'gradcos'"]),
    ("pntk", "labels", "predicted", ["'gradcos'"]),
    ("entk", "probes", 2, ["'trntk'", "'trntk0'", "'pntk'"]),
    ("gradcos", "probes", 1, ["'trntk'"]),
    ("em", "probe_seed", 3, ["'trntk'"]),
    ("ck", "projection", Projection(8), ["'trntk'", "'gradcos'"]),
    ("em", "projection", Projection(8), ["'pntk'"]),
]


@pytest.mark.parametrize("kind,option,value,kinds", _BAD_OPTIONS)
@pytest.mark.parametrize("call", sorted(_CALLS))
def test_inapplicable_option_names_the_kinds_it_applies_to(
    mlp: nn.Module, call: str, kind: str, option: str, value: Any, kinds: list[str]
) -> None:
    with pytest.raises(InputError, match=f"{option}= applies only to") as e:
        _CALLS[call](mlp, kind=kind, **{option: value})
    msg = str(e.value)
    assert all(k in msg for k in kinds) and f"not to kind={kind!r}" in msg and f"remove {option}=" in msg


def test_label_options_of_each_entry_point(mlp: nn.Module) -> None:
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(InputError, match="other_labels= applies only to.*'gradcos'"):
        tl.kernel(mlp, X, X, kind="trntk", other_labels=y)
    with pytest.raises(InputError, match="test_labels= applies only to.*'gradcos'"):
        tl.train_test_kernels(mlp, X, X[:2], kind="em", test_labels=y[:2])


def test_default_option_values_are_accepted_by_every_kind(mlp: nn.Module) -> None:
    defaults = dict(parameters=None, probes=None, probe_seed=0, modules=None, projection=None)
    for kind in tl.available_kinds():
        labels = "predicted" if kind in ("gradcos", "margin") else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tl.kernel(mlp, X, X[:2], kind=kind, labels=labels, other_labels=labels, **defaults)
            tl.train_test_kernels(mlp, X, X[:2], kind=kind, labels=labels, test_labels=labels, **defaults)
            next(tl.iter_features(mlp, X, kind=kind, labels=labels, **defaults))
    # (inputs, labels) pairs are data, not the labels option: every kind takes them
    tl.kernel(mlp, (X, torch.zeros(6)), kind="trntk")


def _hook_count(m: nn.Module) -> int:
    return sum(len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules())


@pytest.mark.parametrize("kind", ["trntk", "em", "ck"])
def test_iter_features_leaves_the_model_untouched_between_blocks(kind: str) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.ReLU(), nn.Linear(5, 3))
    m.train()
    m[0].weight.requires_grad_(False)  # with an explicit selection it is differentiated, then refrozen
    seen: list[int] = []
    m[3].register_forward_hook(lambda mod, a, o: seen.append(o.shape[0]))  # the caller's own hook
    hooks = _hook_count(m)
    params = list(m.parameters()) if kind == "trntk" else None
    gen = tl.iter_features(m, X, kind=kind, batch_size=2, parameters=params)
    start, block = next(gen)
    assert start == 0 and block.shape[0] == 2
    assert all(s.training for s in m.modules())  # still in train mode while the generator is paused
    assert _hook_count(m) == hooks
    assert not m[0].weight.requires_grad
    m[0].register_forward_hook(lambda mod, a, o: None)  # the caller adds a hook between blocks
    rest = list(gen)
    assert _hook_count(m) == hooks + 1 and all(s.training for s in m.modules())
    assert [s for s, _ in rest] == [2, 4] and seen  # the caller's hook ran during the captures
    full = tl.features(m, X, kind=kind, batch_size=2, parameters=params)
    torch.testing.assert_close(torch.cat([block] + [b for _, b in rest]), full)
    # an abandoned generator leaves nothing behind either
    gen2 = tl.iter_features(m, X, kind=kind, batch_size=2, parameters=params)
    next(gen2)
    assert _hook_count(m) == hooks + 1
    del gen2
    assert _hook_count(m) == hooks + 1 and all(s.training for s in m.modules())


def test_gradcos_label_leak_warned_for_every_labelled_source(mlp: nn.Module) -> None:
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    labelled = {
        "pair": (X, y),
        "TensorDataset": TensorDataset(X, y),
        "DataLoader": DataLoader(TensorDataset(X, y), batch_size=4),
        "labels=": None,
    }
    for name, rows in labelled.items():
        kw: dict[str, Any] = {"labels": y} if rows is None else {}
        rows = X if rows is None else rows
        with pytest.warns(UserWarning, match="leaks them.*labels='predicted'"):
            tl.kernel(mlp, rows, (X, y), kind="gradcos", **kw)
        with pytest.warns(UserWarning, match="test_labels='predicted'"):
            tl.train_test_kernels(mlp, (X, y), rows, kind="gradcos", test_labels=kw.get("labels"))
        assert name
    # honest surrogates and unlabelled sources: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tl.kernel(mlp, TensorDataset(X, y), X, kind="gradcos", labels="predicted", other_labels="predicted")
        tl.train_test_kernels(mlp, X, TensorDataset(X), kind="gradcos", labels="predicted",
                              test_labels="predicted")


def test_scikit_learn_floor_matches_the_api_used() -> None:
    # validate_data and __sklearn_tags__ (tangentlens.surrogate) appeared in scikit-learn 1.6
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"scikit-learn>=([0-9.]+)"', text)
    assert floor is not None and tuple(int(v) for v in floor.group(1).split(".")[:2]) >= (1, 6)
    from sklearn.utils.validation import validate_data  # noqa: F401
