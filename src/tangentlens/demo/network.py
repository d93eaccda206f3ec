"""The demo's network: a small CNN for scikit-learn's 8x8 digits, trained deterministically."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ..datasets.digits import DigitsSplit

__all__ = ["DigitsCNN", "train_cnn"]


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digits: 3,706 parameters.

    conv(1→8, 3x3) · BN · ReLU · maxpool 2 → conv(8→16, 3x3) · BN · ReLU · maxpool 2 → flatten (64)
    → linear(64→32) · ReLU → linear(32→10). The input of the last linear layer (32 features) is what the
    conjugate kernel (CK) uses.
    """

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.hidden = nn.Linear(64, 32)
        self.act = nn.ReLU()
        self.head = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, 10) for inputs of shape (N, 1, 8, 8)."""
        return self.head(self.act(self.hidden(self.features(x))))


def train_cnn(
    data: DigitsSplit,
    *,
    seed: int,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    progress: bool = False,
) -> DigitsCNN:
    """Train a :class:`DigitsCNN` with Adam and a cosine learning-rate schedule, deterministically.

    The initialization and the mini-batch order are drawn from ``torch.manual_seed(seed)`` and a
    ``torch.Generator`` seeded with ``seed``. Training runs on one CPU thread (restored afterwards): a
    multi-threaded reduction order would make the weights, hence every number downstream, depend on the
    core count. Cost: ``epochs * N_train`` forward and backward passes (about 1-3 s for the full split).

    Returns:
        The trained model, in eval mode.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trajectory then does not depend on the machine's core count
    try:
        return _train(data, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _train(
    data: DigitsSplit,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    progress: bool,
) -> DigitsCNN:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = DigitsCNN(data.n_classes)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(data.y_train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = tqdm(range(epochs), desc="train CNN", unit="epoch", disable=not progress, file=sys.stderr,
               leave=False)
    for _ in bar:
        order = torch.randperm(len(data.y_train), generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(order):.3f}")
    bar.close()
    model.eval()
    return model
