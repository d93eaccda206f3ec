"""The ``tangentlens`` command line, the demo's data split, and an end-to-end ``demo --quick`` run."""

from __future__ import annotations

import importlib.util
import io
import json

import numpy as np
import pytest
import torch

from tangentlens import __version__
from tangentlens.cli import build_parser, main
from tangentlens.datasets.digits import load_digits_split
from tangentlens.errors import InputError

HAS_ENGINE = all(
    importlib.util.find_spec(m) is not None
    for m in ("tangentlens.api", "tangentlens.surrogate", "tangentlens.faithfulness",
              "tangentlens.explain")
)
needs_engine = pytest.mark.skipif(not HAS_ENGINE, reason="the kernel engine/surrogate modules are absent")


# ---------------------------------------------------------------------------------------------- CLI
def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"tangentlens {__version__}"


def test_defaults_parse() -> None:
    args = build_parser().parse_args(["demo"])
    assert str(args.out) == "tangentlens-report"
    assert args.seed == 0 and args.quick is False and args.threads == 1 and args.no_progress is False
    args = build_parser().parse_args(["demo", "--out", "x", "--seed", "7", "--quick", "--threads", "2",
                                      "--no-progress"])
    assert str(args.out) == "x" and args.seed == 7 and args.quick and args.threads == 2
    assert args.no_progress


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "a command is required"),
        (["frobnicate"], "invalid choice"),
        (["demo", "--seed", "abc"], "non-negative integer"),
        (["demo", "--seed", "-1"], "non-negative integer"),
        (["demo", "--seed", "1.5"], "non-negative integer"),
        (["demo", "--seed", str(2**32)], "below 2**32"),
        (["demo", "--threads", "0"], "positive integer"),
        (["demo", "--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_out_that_is_a_file_exits_2(tmp_path, capsys) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(f)])
    assert exc.value.code == 2
    assert "is not a folder" in capsys.readouterr().err


def test_library_errors_exit_1(monkeypatch, tmp_path, capsys) -> None:
    import tangentlens.demo as demo

    def boom(*args, **kwargs):
        raise InputError("change this")

    monkeypatch.setattr(demo, "run_demo", boom)
    assert main(["demo", "--out", str(tmp_path / "r")]) == 1
    assert "tangentlens: error: change this" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- digits
def test_digits_split_is_seeded_stratified_and_normalized() -> None:
    a = load_digits_split(seed=0)
    b = load_digits_split(seed=0)
    c = load_digits_split(seed=1)
    assert a.x_train.shape == (1200, 1, 8, 8) and a.x_test.shape == (597, 1, 8, 8)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    counts = np.bincount(a.y_train.numpy(), minlength=10)
    assert counts.min() >= 114 and counts.max() <= 126  # ~proportional to the 174..183 per class
    assert abs(float(a.x_train.mean())) < 1e-5 and abs(float(a.x_train.std()) - 1) < 1e-3
    # train and test are disjoint and together cover the 1,797 images
    idx = np.concatenate([a.train_index, a.test_index])
    assert np.array_equal(np.sort(idx), np.arange(1797))
    img = a.to_image(a.x_test[:2])
    assert img.shape == (2, 8, 8) and img.min() >= 0 and img.max() <= 1
    small = load_digits_split(100, 50, seed=3)
    assert len(small.y_train) == 100 and len(small.y_test) == 50
    assert np.bincount(small.y_test.numpy(), minlength=10).min() == 5


def test_digits_split_bad_sizes() -> None:
    with pytest.raises(InputError):
        load_digits_split(1500, 500)
    with pytest.raises(InputError):
        load_digits_split(5, 100)


@pytest.mark.slow
# ---------------------------------------------------------------------------------------- end to end
@needs_engine
def test_demo_quick_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    for word in ("trNTK", "trNTK0", "pNTK", "Em", "CK", "distilled", "SGD ref", "tau", "Gamma"):
        assert word in text
    for name in ("index.html", "scatter.png", "gallery.png", "results.json"):
        assert (out / name).is_file(), name
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "<table" in html and "trNTK" in html and html.count("data:image/png;base64,") == 2
    assert __version__ in html and "seed" in html
    rows = json.loads((out / "results.json").read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"trNTK", "trNTK0", "pNTK", "Em", "CK"} <= kernels
    for r in rows:
        assert -1.0 <= r["tau"] <= 1.0 and 0.0 <= r["acc"] <= 1.0
    trntk = [r for r in rows if r["kernel"] == "trNTK" and r["target"] == "labels"][0]
    assert trntk["tau"] > 0.3 and trntk["acc"] > 0.8


@pytest.mark.slow
@needs_engine
def test_demo_is_deterministic(tmp_path) -> None:
    from tangentlens.demo import KERNELS, SURROGATES, DemoConfig, run_demo

    kernels = [k for k in KERNELS if k.name in ("trNTK", "trNTK0", "CK")]
    cfg = dict(n_train=150, n_test=60, epochs=4, gallery_rows=2, top_k=2, progress=False)
    res = [
        run_demo(DemoConfig(out=tmp_path / f"r{i}", seed=5, **cfg), kernels=kernels,
                 surrogates=SURROGATES, stdout=io.StringIO())
        for i in range(2)
    ]

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.endswith(" s")} for r in rows]

    assert strip(res[0].rows) == strip(res[1].rows)
    assert len(res[0].rows) == 2 * 3 + 2  # labels, distilled on all three; SGD ref, T=2 on trNTK
    assert res[0].index.is_file() and all(p.is_file() for p in res[0].images)
