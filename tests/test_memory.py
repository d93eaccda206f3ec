"""The memory budget: blocks split and layers kept factored to fit it, with the same kernel either way."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import tangentlens as tl
from tangentlens.capture import GradientCapture
from tangentlens.errors import InputError, MemoryBudgetWarning

from .models import cnn, data
from .oracles import oracle_kernel

CALLS: list[int] = []  # batch sizes of Counting's forward calls (module-level: survives the float64 copy)


class Counting(nn.Module):
    """Wraps a model and records the batch size of every forward call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS.append(int(x.shape[0]))
        return self.inner(x)


def test_small_budget_splits_blocks_and_keeps_the_kernel() -> None:
    m = Counting(cnn())
    x = data("cnn", 24)
    ref = oracle_kernel(m, x, kind="trntk0")
    CALLS.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        K = tl.kernel(m, x, kind="trntk0", dtype=torch.float64, memory_budget=2**17)
    said = [w for w in rec if issubclass(w.category, MemoryBudgetWarning)]
    assert len(said) == 1 and "memory_budget=" in str(said[0].message)
    assert float((K - ref).abs().max()) <= 1e-9 * float(ref.abs().max())
    assert max(CALLS) < 24  # the 24 examples were captured in smaller blocks
    CALLS.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryBudgetWarning)  # a generous budget says nothing
        K2 = tl.kernel(m, x, kind="trntk0", dtype=torch.float64)
    assert 24 in CALLS
    torch.testing.assert_close(K2, K)


def test_small_cache_keeps_layers_factored() -> None:
    # a Conv layer materializes when that is much cheaper; with no room for the cache it stays factored
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(2, 3, 5, padding=2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 40, 3))
    x = torch.randn(10, 2, 40)
    caps: list[GradientCapture] = []
    init = GradientCapture.__init__

    def spy(self: GradientCapture, *a: object, **k: object) -> None:
        init(self, *a, **k)  # type: ignore[arg-type]
        caps.append(self)

    GradientCapture.__init__ = spy  # type: ignore[method-assign]
    try:
        K = tl.kernel(m, x, kind="trntk", dtype=torch.float64, batch_size=4)
        dense = [r.group for r in caps[-1].rules if r.dense]
        with pytest.warns(MemoryBudgetWarning, match="factored"):
            K0 = tl.kernel(m, x, kind="trntk", dtype=torch.float64, batch_size=4, cache_bytes=1)
        dense0 = [r.group for r in caps[-1].rules if r.dense]
    finally:
        GradientCapture.__init__ = init  # type: ignore[method-assign]
    assert dense == ["0"] and dense0 == []
    torch.testing.assert_close(K0, K)
    torch.testing.assert_close(K, oracle_kernel(m, x, kind="trntk"))


def test_features_within_budget_equal_unbounded() -> None:
    m = cnn()
    x = data("cnn", 9)
    F = tl.features(m, x, kind="trntk0", dtype=torch.float64)
    with pytest.warns(MemoryBudgetWarning):
        Fb = tl.features(m, x, kind="trntk0", dtype=torch.float64, memory_budget=2**16)
    torch.testing.assert_close(Fb, F)
    blocks = list(tl.iter_features(m, x, kind="pntk", memory_budget=2**16))
    assert len(blocks) > 1 and [s for s, _ in blocks] == sorted(s for s, _ in blocks)


def test_dynamic_padding_blocks_of_different_length() -> None:
    # a DataLoader that pads each batch to its own longest sequence: positions differ between blocks, the
    # per-layer choice (factored or materialized) is made once, so blocks still pair up
    torch.manual_seed(0)

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 6, padding_idx=0)
            self.lin = nn.Linear(6, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # padding-invariant: pad positions masked
            h = torch.tanh(self.lin(self.emb(x))) * (x != 0)[..., None]
            return self.head(h.sum(1))

    seqs = [torch.randint(1, 20, (n,)) for n in (3, 2, 5, 7, 4, 6)]  # T = 3, then 7, then 6

    def collate(batch: list[torch.Tensor]) -> torch.Tensor:
        return nn.utils.rnn.pad_sequence(batch, batch_first=True)

    m = Seq()
    dl = DataLoader(seqs, batch_size=2, collate_fn=collate)
    K = tl.kernel(m, dl, kind="trntk0", dtype=torch.float64)
    padded = collate(seqs)
    torch.testing.assert_close(K, oracle_kernel(m, padded, kind="trntk0"))


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1GB"])
def test_bad_memory_budget(bad: object) -> None:
    m = cnn()
    with pytest.raises(InputError, match="memory_budget"):
        tl.kernel(m, data("cnn", 3), memory_budget=bad)  # type: ignore[arg-type]


def test_a_block_sliced_from_a_large_tensor_is_planned_by_its_own_bytes() -> None:
    # x[:n] shares the storage of all 20,000 examples; the plan must count the bytes the block spans
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 28 * 28, 3))
    big = torch.rand(20_000, 1, 28, 28)
    sizes = []
    for x in (big[:300], big[:300].clone()):
        cfg = tl.KernelConfig(kind="pntk", memory_budget=256 * 2**20,
                              projection=tl.Projection(64, kind="sjlt", seed=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MemoryBudgetWarning)
            with tl.Featurizer(model, cfg) as f:
                next(iter(f.blocks(x)))
                sizes.append(f.planned_block_size)
    assert sizes[0] == sizes[1]
