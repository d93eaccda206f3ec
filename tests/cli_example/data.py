"""Data factories of the example project (generated, seeded)."""

from __future__ import annotations

import torch

WORDS = ("<pad>", "good", "great", "fine", "bad", "awful", "poor", "the", "a", "movie", "plot", "cast")


def blobs(n_train: int = 60, n_test: int = 30, n_in: int = 8, n_classes: int = 3, seed: int = 0) -> dict:
    """Gaussian blobs: one centre per class, unit noise."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(n_classes, n_in, generator=g)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % n_classes
        return centres[y] + torch.randn(n, n_in, generator=g), y

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "classes": [f"blob{c}" for c in range(n_classes)]}


def images(n_train: int = 40, n_test: int = 12, seed: int = 0) -> tuple:
    """6 x 6 images: a bright row (class 0), column (class 1) or diagonal (class 2), plus noise."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 3
        x = 0.3 * torch.randn(n, 1, 6, 6, generator=g)
        for i, c in enumerate(y.tolist()):
            k = i % 6
            if c == 0:
                x[i, 0, k, :] += 2.0
            elif c == 1:
                x[i, 0, :, k] += 2.0
            else:
                x[i, 0].diagonal().add_(2.0)
        return x, y

    return (*split(n_train), *split(n_test))


def reviews(n_train: int = 40, n_test: int = 10, length: int = 6, seed: int = 0) -> dict:
    """Token-id "reviews": positive words for class 1, negative for class 0, padded to ``length``."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[dict, torch.Tensor]:
        y = torch.arange(n) % 2
        ids = torch.zeros(n, length, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        for i, c in enumerate(y.tolist()):
            m = int(torch.randint(3, length + 1, (1,), generator=g))
            sentiment = torch.randint(1, 4, (m,), generator=g) + (0 if c else 3)
            filler = torch.randint(7, 12, (m,), generator=g)
            words = torch.where(torch.rand(m, generator=g) < 0.5, sentiment, filler)
            ids[i, :m], mask[i, :m] = words, 1
        return {"input_ids": ids, "attention_mask": mask}, y

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "classes": ["negative", "positive"], "vocab": list(WORDS)}


def wrong_shape() -> dict:
    """Returns labels of the wrong length (for the error test)."""
    return {"x_train": torch.zeros(5, 8), "y_train": torch.zeros(4, dtype=torch.long),
            "x_test": torch.zeros(2, 8), "y_test": torch.zeros(2, dtype=torch.long)}
