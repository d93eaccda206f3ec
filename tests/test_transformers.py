"""Real Hugging Face classifiers (small configs, random weights, no download) and broadcast inputs.

Every exact kind against the explicit float64 oracle (per example, per logit autograd on batch-1 slices,
which is how ``position_ids`` of shape (1, L) are meant), with dict batches, varied padding and the
library's default ``position_ids``; projected features against projecting the oracle's Jacobians. Also the
layers whose input does not carry the block's batch: broadcast buffers (made per-example exactly),
unbatched or sequence-first calls (routed to the exact fallback), and the per-example check that sees an
error a batch-summed check cannot.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

import tangentlens as tl
from tangentlens.errors import UnsupportedLayerWarning
from tangentlens.projection import Projection

from .models import SequenceFirst, quiet
from .oracles import jacobians, kernel_from_jacobians, oracle_kernel

transformers = pytest.importorskip("transformers")

C = 3
SMALL = dict(hidden_size=16, num_attention_heads=2, intermediate_size=24, vocab_size=60,
             max_position_embeddings=32, num_labels=C, attn_implementation="eager")


def _bert() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(num_hidden_layers=2, **SMALL))


def _roberta() -> nn.Module:
    torch.manual_seed(1)
    cfg = transformers.RobertaConfig(num_hidden_layers=2, pad_token_id=1, **SMALL)
    return transformers.RobertaForSequenceClassification(cfg)


def _distilbert() -> nn.Module:
    torch.manual_seed(2)
    cfg = transformers.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=24, vocab_size=60,
                                        max_position_embeddings=32, num_labels=C,
                                        attn_implementation="eager")
    return transformers.DistilBertForSequenceClassification(cfg)


HF = {"bert": _bert, "roberta": _roberta, "distilbert": _distilbert}


@functools.cache
def hf_model(name: str) -> nn.Module:
    m = HF[name]()
    m.train()  # the caller's mode: dropout is switched off by the library, and restored
    return m


def hf_batch(n: int, length: int = 7, seed: int = 0, token_types: bool = False) -> dict[str, torch.Tensor]:
    """Token ids with varied right padding (0 to 3 pad tokens per example), attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        k = i % 4
        if k:
            mask[i, -k:] = 0
            ids[i, -k:] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        batch["token_type_ids"] = (torch.arange(length)[None] >= length // 2).long().expand(n, -1)
    return batch


@functools.cache
def oracle_jacobians(name: str, n: int, seed: int) -> torch.Tensor:
    return jacobians(hf_model(name), hf_batch(n, seed=seed))


@pytest.mark.parametrize("name", list(HF))
@pytest.mark.parametrize("kind", ["trntk0", "trntk", "pntk", "entk"])
def test_hf_classifier_matches_oracle(name: str, kind: str) -> None:
    m = hf_model(name)
    x1, x2 = hf_batch(6, seed=0), hf_batch(5, seed=1)
    J1, J2 = oracle_jacobians(name, 6, 0), oracle_jacobians(name, 5, 1)
    ref_sym = kernel_from_jacobians(J1, J1, kind)
    ref_cross = kernel_from_jacobians(J1, J2, kind)
    K = quiet(tl.kernel, m, x1, kind=kind, dtype=torch.float64, batch_size=4)
    Kx = quiet(tl.kernel, m, x1, x2, kind=kind, dtype=torch.float64, batch_size=4)
    scale = float(ref_sym.abs().max())
    assert float((K - ref_sym).abs().max()) <= 1e-6 * scale
    assert float((Kx - ref_cross).abs().max()) <= 1e-6 * scale
    K32 = quiet(tl.kernel, m, x1, x2, kind=kind, batch_size=4)
    assert K32.dtype == torch.float32
    assert float((K32.double() - ref_cross).abs().max()) <= 1e-4 * scale
    assert m.training  # the caller's mode is restored


@pytest.mark.parametrize("name", list(HF))
def test_hf_gradcos_matches_oracle(name: str) -> None:
    m = hf_model(name)
    x = hf_batch(5, seed=3)
    y = torch.tensor([0, 2, 1, 1, 0])
    ref = oracle_kernel(m, x, kind="gradcos", y1=y)
    K = quiet(tl.kernel, m, (x, y), kind="gradcos", dtype=torch.float64, batch_size=3)
    assert float((K - ref).abs().max()) <= 1e-6


def test_bert_token_type_ids_and_batch_size_one() -> None:
    # explicit token_type_ids; a last block of one example; no warning about a fallback (all exact rules)
    m = hf_model("bert")
    x = hf_batch(5, seed=4, token_types=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedLayerWarning)
        K = tl.kernel(m, x, kind="trntk0", dtype=torch.float64, batch_size=2)
    assert float((K - oracle_kernel(m, x, kind="trntk0")).abs().max()) <= 1e-6 * float(K.abs().max())


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_hf_projected_features_equal_projected_jacobians(name: str) -> None:
    m = hf_model(name)
    x = hf_batch(6, seed=0)
    J = oracle_jacobians(name, 6, 0)
    for kind in ("rademacher", "sjlt"):
        proj = Projection(64, kind=kind, seed=5)
        R = proj.matrix(J.shape[2])
        f = quiet(tl.features, m, x, kind="trntk0", projection=proj, dtype=torch.float64, batch_size=4)
        torch.testing.assert_close(f, (J @ R.T).reshape(6, -1), rtol=1e-8, atol=1e-10)
        fp = quiet(tl.features, m, x, kind="pntk", projection=proj, dtype=torch.float64, batch_size=4)
        torch.testing.assert_close(fp, J.sum(1) @ R.T / C**0.5, rtol=1e-8, atol=1e-10)
    fe = quiet(tl.features, m, x, kind="pntk", dtype=torch.float64, batch_size=4)
    torch.testing.assert_close(fe, J.sum(1) / C**0.5, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", ["rademacher", "sjlt", "kronecker"])
def test_bert_proj_pntk_tracks_exact_cosine(kind: str) -> None:
    m = hf_model("bert")
    x = hf_batch(8, seed=5)
    J = oracle_jacobians_pntk(8, 5)
    exact = J @ J.T / torch.outer(J.norm(dim=1), J.norm(dim=1))
    pk = quiet(tl.kernel, m, x, kind="pntk", normalize=True, projection=Projection(4096, kind=kind, seed=0),
               dtype=torch.float64)
    assert torch.equal(pk.diagonal(), torch.ones(8, dtype=torch.float64))
    assert float((pk - exact).abs().max()) < 0.06


@functools.cache
def oracle_jacobians_pntk(n: int, seed: int) -> torch.Tensor:
    return jacobians(hf_model("bert"), hf_batch(n, seed=seed)).sum(1)


# --------------------------------------------------------------------------------------------------
# Layers fed inputs that do not carry the block's batch
# --------------------------------------------------------------------------------------------------


class BufferModel(nn.Module):
    """A Linear applied to a buffer and broadcast over the batch, in several ways."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.mode = mode
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(5, 6)
        self.pos = nn.Embedding(9, 6)
        self.head = nn.Linear(6, C)
        self.register_buffer("row", torch.randn(1, 5))
        self.register_buffer("vec", torch.randn(5))
        self.register_buffer("ids", torch.arange(3)[None])  # (1, 3) like BERT's position_ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "row":  # (1, 6) broadcast over the batch: made per-example exactly
            c = self.shared(self.row)[:, None, :]
        elif self.mode == "trailing":  # (1, 6) broadcast against (B, 3, 6) as trailing axes: fallback
            c = self.shared(self.row)
        elif self.mode == "vector":  # unbatched (6,): fallback
            c = self.shared(self.vec)
        else:  # "summed": the (1, 6) output is reduced over its first axis, so it cannot be expanded
            c = self.shared(self.row).sum(0)
        h = torch.tanh(self.inp(x)[:, None, :] + c + self.pos(self.ids))  # (B, 3, 6)
        return self.head(h.mean(1))


@pytest.mark.parametrize(
    "mode,fallback", [("row", False), ("trailing", True), ("vector", True), ("summed", True)]
)
@pytest.mark.parametrize("kind", ["trntk0", "pntk", "entk"])
def test_broadcast_buffers_are_exact(mode: str, fallback: bool, kind: str) -> None:
    m = BufferModel(mode)
    x = torch.randn(7, 4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        K = tl.kernel(m, x, kind=kind, dtype=torch.float64, batch_size=4)
    ref = oracle_kernel(m, x, kind=kind)
    assert float((K - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    warned = [str(w.message) for w in rec if issubclass(w.category, UnsupportedLayerWarning)]
    assert bool(warned) == fallback, warned
    if fallback:  # only the Linear on the buffer; the (1, 3) position ids stay on the exact fast path
        assert any("shared" in w for w in warned) and not any("pos" in w for w in warned), warned


def test_broadcast_buffer_projected_and_features() -> None:
    m = BufferModel("row")
    x = torch.randn(6, 4)
    J = jacobians(m, x)
    f = tl.features(m, x, kind="pntk", dtype=torch.float64)
    torch.testing.assert_close(f, J.sum(1) / C**0.5, rtol=1e-9, atol=1e-12)
    proj = Projection(32, kind="rademacher", seed=1)
    fp = tl.features(m, x, kind="trntk0", projection=proj, dtype=torch.float64, batch_size=4)
    torch.testing.assert_close(fp, (J @ proj.matrix(J.shape[2]).T).reshape(6, -1), rtol=1e-9, atol=1e-10)
    for kind in ("sjlt", "kronecker"):
        pk = tl.kernel(m, x, kind="trntk", projection=Projection(64, kind=kind, seed=0), dtype=torch.float64)
        assert pk.shape == (6, 6) and torch.isfinite(pk).all()



@pytest.mark.parametrize("length", [5, 4])
def test_sequence_first_layer_uses_fallback(length: int) -> None:
    # length 4 == the first block's 4 examples: the call looks batch-first, the batch sum of the hook
    # gradients equals autograd's, and only the per-example (randomly weighted) check sees the error
    m = SequenceFirst()
    x = torch.randn(4, length, 2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        K = tl.kernel(m, x, kind="trntk0", dtype=torch.float64)
    ref = oracle_kernel(m, x, kind="trntk0")
    assert float((K - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    msgs = " ".join(str(w.message) for w in rec)
    assert "mix" in msgs
    if length == 4:
        assert "per-example gradients disagree" in msgs


def test_bert_functional_implementation_equals_layer_rules() -> None:
    m = hf_model("bert")
    x = hf_batch(5, seed=6)
    a = quiet(tl.kernel, m, x, kind="trntk0", dtype=torch.float64)
    b = quiet(tl.kernel, m, x, kind="trntk0", dtype=torch.float64, implementation="functional")
    assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())
