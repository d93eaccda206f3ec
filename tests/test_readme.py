"""The README's "Larger than memory" examples run as written (on a tiny model), so the docs cannot rot."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tangentlens as tl

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(title: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


class _Net(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def test_functional_core_examples_run() -> None:
    import json

    blocks = _section_blocks("The functional core")
    torch.manual_seed(0)
    model = _Net().eval()
    x_train, x_test = torch.randn(30, 6), torch.randn(6, 6)
    with torch.no_grad():
        network_logits = model(x_test)
        network_probs = torch.softmax(model(x_train), 1).numpy()
    y_train, y_test = np.arange(30) % 3, np.arange(6) % 3
    ns: dict[str, object] = {"model": model, "x": x_train, "x_train": x_train, "x_test": x_test,
                             "y_train": y_train, "y_test": y_test, "network_logits": network_logits,
                             "network_probs": network_probs, "torch": torch, "json": json, "np": np}
    exec(blocks[0], ns)  # noqa: S102 - the README's own code
    assert ns["K"].shape == (30, 30) and ns["K_test"].shape == (6, 30)  # type: ignore[attr-defined]
    second = blocks[1].replace("tl.KernelConfig(kind=\"trntk\", modules=[\"fc1\"])",
                               "pytest.raises(tl.InputError)")  # the line that shows an error
    with pytest.raises(tl.InputError, match="modules"):
        tl.KernelConfig(kind="trntk", modules=["fc1"])
    ns["pytest"] = pytest
    exec(second.replace("        ...", "        pass"), ns)  # noqa: S102
    assert ns["same"] == ns["cfg"]
    exec(blocks[2], ns)  # noqa: S102
    assert ns["A"].shape == (6, 3, 30)  # type: ignore[attr-defined]
    projected = next(b for b in blocks if "Projection(2048" in b)
    exec(projected, ns)  # noqa: S102
    assert ns["phi"].shape == (30, 3 * 2048)  # type: ignore[attr-defined]


def test_larger_than_memory_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _section_blocks("Larger than memory")
    assert len(blocks) == 4  # stores; the surrogate; attribution; Dask (tests/test_distributed.py runs that)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    train_x, test_x = torch.randn(40, 6), torch.randn(7, 6)
    with torch.no_grad():
        train_logits = model(train_x)
    train_y, test_y = train_logits.argmax(1), model(test_x).argmax(1)
    ns: dict[str, object] = {"model": model, "train_x": train_x, "test_x": test_x, "train_y": train_y,
                             "test_y": test_y, "train_logits": train_logits, "i": np.arange(3),
                             "j": np.arange(3, 6)}
    exec(blocks[0], ns)  # noqa: S102 - the README's own code
    fs = ns["fs"]
    assert os.path.isdir("train.zarr") and fs.complete and ns["kt"].shape == (7, 40)  # type: ignore[attr-defined]
    sur = tl.PrimalKernelSurrogate(alpha=1e-2, normalize=True)
    sur.fit(fs.features, train_y.numpy())  # type: ignore[attr-defined]
    ns["sur"] = sur
    exec(blocks[1], ns)  # noqa: S102
    assert np.array_equal(ns["sur"].class_coef_, sur.class_coef_)  # type: ignore[attr-defined]
    exec(blocks[2], ns)  # noqa: S102
    S, top = ns["S"], ns["top"]
    assert S.shape == (7, 40)  # type: ignore[attr-defined]
    assert tuple(top.proponents.shape) == (7, 10)  # type: ignore[attr-defined]
    assert torch.equal(top.proponents[:, 0], torch.as_tensor(S).argmax(1))  # type: ignore[attr-defined]
