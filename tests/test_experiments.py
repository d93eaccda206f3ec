"""The experiment scripts' training code: reference models and seed-vectorized, resumable training."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from models import SETTINGS, _cnn_stacked, make_model, train_group  # noqa: E402


def _data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 2


def test_reference_parameter_counts() -> None:
    assert sum(p.numel() for p in make_model("mlp", 0).parameters()) == 98_801
    assert sum(p.numel() for p in make_model("cnn", 0).parameters()) == 39_081


def test_stacked_cnn_is_the_reference_cnn_per_model() -> None:
    # float64, three models, each on its own inputs: values and parameter gradients of the hand-stacked
    # forward against each model's own ReferenceCNN.forward
    models = [make_model("cnn", s).double() for s in (0, 1, 2)]
    params, buffers = torch.func.stack_module_state(models)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    xb = torch.rand(3, 5, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = _cnn_stacked(params, buffers, xb)
    grads = torch.autograd.grad(out.square().sum(), list(params.values()))
    for i, m in enumerate(models):
        o = m(xb[i])
        torch.testing.assert_close(out[i], o, rtol=1e-12, atol=1e-12)
        own = torch.autograd.grad(o.square().sum(), list(m.parameters()))
        for k, g, gm in zip(params, grads, own):
            torch.testing.assert_close(g[i], gm, rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_group_training_equals_one_model_at_a_time(arch: str) -> None:
    x, y = _data()
    rec = replace(SETTINGS[f"mnist2-{arch}"].recipe, epochs=2, batch_size=4, lr=0.05)
    group, _ = train_group(arch, [3, 5], x, y, rec, progress=False)
    alone, _ = train_group(arch, [5], x, y, rec, progress=False)
    for (k, a), b in zip(group[1].state_dict().items(), alone[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def _plain_loop(arch: str, seed: int, x: torch.Tensor, y: torch.Tensor, rec) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    """The reference scripts' training loop, one model, plain autograd (the oracle for train_group)."""
    model, init = make_model(arch, seed), make_model(arch, seed)
    cls = torch.optim.SGD if rec.optimizer == "sgd" else torch.optim.Adam
    opt = cls(model.parameters(), lr=rec.lr)
    g = torch.Generator().manual_seed(seed)
    yf = y.float()
    for _ in range(rec.epochs):
        order = torch.randperm(len(x), generator=g) if rec.shuffle else torch.arange(len(x))
        for i in range(0, len(x), rec.batch_size):
            idx = order[i : i + rec.batch_size]
            out = model(x[idx])[:, 0]
            if rec.loss == "mse_sigmoid":
                loss = torch.nn.functional.mse_loss(torch.sigmoid(out), yf[idx])
            else:
                with torch.no_grad():
                    out0 = init(x[idx])[:, 0]
                loss = torch.nn.functional.mse_loss(out - out0, yf[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@pytest.fixture
def float64() -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("setting", ["mnist2-mlp", "mnist2-cnn", "fmnist2-cnn"])
def test_group_training_equals_the_reference_loop(setting: str, float64: None) -> None:
    # in float64: Adam scales every step to about lr whatever the gradient's size, so in float32 a
    # near-zero gradient whose sign differs by rounding moves a weight by ~1e-4 between the two loops
    x, y = _data()
    s = SETTINGS[setting]
    rec = replace(s.recipe, epochs=2, lr=0.05 if s.recipe.optimizer == "sgd" else 1e-3)
    group, _ = train_group(s.arch, [3, 5], x, y, rec, progress=False)
    plain = _plain_loop(s.arch, 5, x, y, rec)
    for (k, a), b in zip(group[1].state_dict().items(), plain.state_dict().values()):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_interrupted_training_resumes_bit_for_bit(tmp_path: Path, optimizer: str) -> None:
    x, y = _data()
    rec = replace(SETTINGS["mnist2-mlp"].recipe, epochs=3, batch_size=4, lr=0.01, optimizer=optimizer)
    straight, _ = train_group("mlp", [0, 1], x, y, rec, progress=False)
    ck = tmp_path / "group.ckpt"
    train_group("mlp", [0, 1], x, y, rec, epochs=1, progress=False, checkpoint=ck)  # "interrupted"
    assert torch.load(ck, weights_only=False)["epoch"] == 1
    resumed, info = train_group("mlp", [0, 1], x, y, rec, progress=False, checkpoint=ck)
    assert torch.load(ck, weights_only=False)["epoch"] == 3
    for m1, m2 in zip(straight, resumed):
        for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
            assert torch.equal(a, b)
    # a finished checkpoint returns the trained models without training again
    again, _ = train_group("mlp", [0, 1], x, y, rec, progress=False, checkpoint=ck)
    for a, b in zip(again[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)
    assert not (tmp_path / "group.ckpt.tmp").exists()


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    x, y = _data()
    rec = replace(SETTINGS["mnist2-mlp"].recipe, epochs=1, batch_size=4)
    ck = tmp_path / "group.ckpt"
    train_group("mlp", [0, 1], x, y, rec, progress=False, checkpoint=ck)
    with pytest.raises(ValueError, match="another run"):
        train_group("mlp", [0, 2], x, y, rec, progress=False, checkpoint=ck)


def _tiny_idx(d: Path) -> None:
    """IDX files of a tiny generated MNIST-like set (labels 0, 1, 2; class 1 has a bright bar)."""
    import numpy as np

    from tangentlens.datasets.idx import write_idx

    rng = np.random.default_rng(0)
    d.mkdir(parents=True)
    for prefix, n in (("train", 60), ("t10k", 30)):
        labels = (np.arange(n) % 3).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        images[labels == 1, 10:18, 12:16] = 255  # learnable in one epoch
        write_idx(d / f"{prefix}-images-idx3-ubyte", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte", labels)


def test_protocol_end_to_end_on_a_tiny_generated_mnist(tmp_path: Path) -> None:
    """protocol.py on generated IDX files: trains, checkpoints, evaluates every surrogate, resumes."""
    import json

    import numpy as np

    _tiny_idx(tmp_path / "data" / "mnist")
    import protocol

    out = tmp_path / "run"
    args = ["--setting", "mnist2-mlp", "--seeds", "2", "--group-size", "2", "--epochs", "1", "--lr", "0.5",
            "--n-train-per-class", "12", "--n-test-per-class", "6", "--data", str(tmp_path / "data"),
            "--threads", "1", "--out", str(out)]
    assert protocol.main(args) == 0
    rec = json.loads((out / "seed_0001.json").read_text())
    for name in ("kglm", "ksvm", "distilled", "ridge"):
        assert np.isfinite(rec[name]["tau"]) and -1 <= rec[name]["tau"] <= 1
    assert (out / "group_0000.ckpt").exists() and (out / "seed_0000_model.pt").exists()
    assert "| ridge |" in (out / "summary.md").read_text()
    # a rerun finds every seed done; another recipe in the same folder is refused
    assert protocol.main(args) == 0
    assert protocol.main([a if a != "0.5" else "0.1" for a in args]) == 2


def test_curves_print_both_readouts_of_the_centered_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """curves.py on a generated FMNIST2 stand-in: per-epoch centered and uncentered accuracies."""
    _tiny_idx(tmp_path / "data" / "fashion-mnist")
    import curves

    curves.main(["--setting", "fmnist2-cnn", "--seeds", "2", "--epochs", "1", "--every", "1",
                 "--shuffle", "yes", "--n-train-per-class", "4", "--n-test-per-class", "3",
                 "--data", str(tmp_path / "data")])
    out = capsys.readouterr().out
    assert "shuffle=True" in out
    line = out.strip().splitlines()[-1]
    assert line.startswith("epoch 1: centered test [") and "| uncentered test [" in line
