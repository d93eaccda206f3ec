"""Small architectures used by the oracle tests (seeded, a few hundred to a few thousand parameters), and
two helpers the kernel tests share."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from tangentlens.errors import UnsupportedLayerWarning


def mlp(d_in: int = 6, C: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, 8), nn.ReLU(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, C))


class CNN(nn.Module):
    """Conv-BN-ReLU(inplace)-pool, Conv1x? with stride, BN, global pool, Linear."""

    def __init__(self, C: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu_(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(x, 2)  # 10x10 -> 5x5
        x = torch.relu(self.bn2(self.conv2(x)))  # -> 2x2
        return self.fc(x.flatten(1))


def cnn(C: int = 3) -> nn.Module:
    torch.manual_seed(1)
    m = CNN(C)
    # non-trivial running statistics, then leave the model in train mode (the caller's mode)
    with torch.no_grad():
        m.train()
        for _ in range(3):
            m(torch.randn(16, 1, 10, 10))
    for bn in (m.bn1, m.bn2):
        nn.init.normal_(bn.weight, 1.0, 0.3)
        nn.init.normal_(bn.bias, 0.0, 0.3)
    m.train()
    return m


class Residual(nn.Module):
    def __init__(self, d: int = 6, C: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.head = nn.Linear(8 + 16, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = self.norm(h + self.block(h))  # residual connection
        c = torch.relu(self.conv(h[:, None, :])).flatten(1)  # Conv1d branch: 2 x 8
        return self.head(torch.cat([h, c], 1))


def residual(C: int = 3) -> nn.Module:
    torch.manual_seed(2)
    return Residual(C=C)


class TinyTransformer(nn.Module):
    """Embedding + positional parameter + LayerNorm + MultiheadAttention + FFN + mean-pool head.

    MultiheadAttention's in-projection is a raw parameter and its out_proj is called functionally, and
    ``pos`` is a bare parameter: these exercise the torch.func fallback next to the fast rules.
    """

    def __init__(self, vocab: int = 11, d: int = 8, T: int = 5, C: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.1)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 12), nn.GELU(), nn.Linear(12, d))
        self.head = nn.Linear(d, C)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        q = self.ln1(h)
        pad = None if attention_mask is None else attention_mask == 0
        a, _ = self.attn(q, q, q, key_padding_mask=pad, need_weights=False)
        h = h + a
        h = h + self.ff(self.ln2(h))
        if attention_mask is None:
            return self.head(h.mean(1))
        w = attention_mask.to(h.dtype)[..., None]
        return self.head((h * w).sum(1) / w.sum(1))


def transformer(C: int = 3) -> nn.Module:
    torch.manual_seed(3)
    return TinyTransformer(C=C)


class SequenceFirst(nn.Module):
    """A Linear (``mix``) called on a (L, B, 8) tensor: its first dimension is positions, not examples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.emb = nn.Linear(2, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, L, 2)
        h = torch.tanh(self.mix(self.emb(x).transpose(0, 1)))  # (L, B, 8)
        return self.head(h.mean(0))


def data(name: str, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(n, 6, generator=g)
    if name == "cnn":
        return torch.randn(n, 1, 10, 10, generator=g)
    if name == "residual":
        return torch.randn(n, 6, generator=g)
    if name == "transformer":
        ids = torch.randint(1, 11, (n, 5), generator=g)
        ids[::3, -1] = 0  # some padding tokens
        return ids
    raise ValueError(name)


ARCHS = {"mlp": mlp, "cnn": cnn, "residual": residual, "transformer": transformer}


def quiet(fn, *a, **k):
    """Call ``fn`` with the fallback's UnsupportedLayerWarning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedLayerWarning)
        return fn(*a, **k)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against ``b`` (in float64)."""
    return float((a.double() - b.double()).norm() / b.double().norm())
