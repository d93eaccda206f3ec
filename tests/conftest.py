"""Fixtures shared by several test files (none is autouse here: a file opts in with
``pytestmark = pytest.mark.usefixtures("one_thread")``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test on one torch thread (small tensors: faster, and immune to oversubscription on shared
    cores), then restore the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cli_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the CLI's example config ``tl.toml`` (``MLP_CONFIG`` of tests/test_cli_own_model.py:
    the MLP of tests/cli_example, its store under ``out/store``) and the trained checkpoint ``mlp.pt`` it
    names; one folder per test module."""
    from .test_cli_own_model import MLP_CONFIG, train_mlp

    root = tmp_path_factory.mktemp("project")
    train_mlp(root / "mlp.pt")
    (root / "tl.toml").write_text(MLP_CONFIG)
    return root
