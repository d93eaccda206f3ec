"""Bad input gets a typed exception that says what to change; fallbacks warn instead of failing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tangentlens as tl
from tangentlens.errors import (
    InputError,
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
