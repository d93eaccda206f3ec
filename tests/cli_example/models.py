"""Model factories of the example project: a small MLP, a small CNN and a bag-of-embeddings text model."""

from __future__ import annotations

import torch
from torch import nn


def make_mlp(n_in: int = 8, hidden: int = 16, n_classes: int = 3) -> nn.Module:
    """An MLP n_in -> hidden -> n_classes (tanh), seeded so that a fresh model is reproducible."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))


def make_cnn(n_classes: int = 3) -> nn.Module:
    """A CNN on 1 x 6 x 6 images."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, n_classes))


class BagOfWords(nn.Module):
    """Mean of token embeddings (padding masked out) -> Linear; called as ``model(input_ids=...,
    attention_mask=...)`` like a Hugging Face classifier."""

    def __init__(self, vocab: int = 12, dim: int = 6, n_classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.out(h)


def make_text_model(vocab: int = 12, n_classes: int = 2) -> nn.Module:
    return BagOfWords(vocab, 6, n_classes)


def not_a_model() -> object:
    """A factory that returns something else (for the error test)."""
    return {"weights": 1}
