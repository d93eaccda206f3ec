"""The commands for your own model (``tangentlens featurize | kernel | fit | explain | attribute | report``)
end to end on the tiny project in ``tests/cli_example`` (an MLP on generated blobs, a CNN on 6x6 images, a
bag-of-embeddings text model), and one test per kind of bad configuration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tangentlens.cli import main
from tangentlens.cli.config import ConfigError, load_config

from .browser import check_page, find_chromium, page_problems

EXAMPLE = Path(__file__).resolve().parent  # holds the cli_example package

MLP_CONFIG = f"""\
python_path = [{str(EXAMPLE)!r}]

[model]
factory = "cli_example.models:make_mlp"
options = {{ hidden = 16 }}
checkpoint = "mlp.pt"

[data]
factory = "cli_example.data:blobs"

[kernels.trNTK]
kind = "trntk"

[kernels.proj-pNTK]
kind = "pntk"
normalize = true
projection = {{ dim = 32, kind = "sjlt", seed = 0 }}

[store]
path = "out/store"
chunk_rows = 16

[explain]
kernel = "proj-pNTK"
target = "distilled"
points = [7, 0, 3, 0]
k = 3
out = "out/explained.json"

[attribute]
points = 4
k = 2
projection = {{ dim = 64, kind = "rademacher", seed = 1 }}
out = "out/attributed.json"

[report]
out = "out/report"
gallery_rows = 2
top_k = 2
"""


def train_mlp(path: Path, hidden: int = 16) -> None:
    """Train cli_example's MLP on its blobs briefly and save its state dict at ``path`` (the checkpoint of
    ``MLP_CONFIG``; the ``cli_project`` fixture of tests/conftest.py uses it)."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import cli_example.data as data  # noqa: I001 - importable from EXAMPLE
        import cli_example.models as models
    finally:
        sys.path.remove(str(EXAMPLE))
    d = data.blobs()
    model = models.make_mlp(hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(d["x_train"]), d["y_train"]).backward()
        opt.step()
    torch.save(model.state_dict(), path)


def _run(*argv: str) -> int:
    return main([*argv, "--no-progress"])


# ---------------------------------------------------------------------------------------- the pipeline
def test_pipeline_writes_where_the_config_says(cli_project, capsys) -> None:
    cfg = str(cli_project / "tl.toml")
    store = cli_project / "out" / "store"
    assert _run("featurize", cfg) == 0
    for name in ("trNTK", "proj-pNTK"):
        for split in ("train", "test"):
            assert (store / name / split / "zarr.json").is_file()
    # an existing store needs --resume; with it the complete store is reused
    assert _run("featurize", cfg) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert _run("featurize", cfg, "--resume", "--kernel", "proj-pNTK") == 0

    assert _run("kernel", cfg) == 0
    assert all((store / n / k / "zarr.json").is_file()
               for n in ("trNTK", "proj-pNTK") for k in ("K_train", "K_test"))

    capsys.readouterr()
    assert _run("fit", cfg) == 0
    table = capsys.readouterr().out
    assert "primal" in table and "dual" in table  # 32-dim features: primal; 585-dim (> N = 60): dual
    fit = json.loads((store / "fit.json").read_text())
    assert {(r["kernel"], r["target"]) for r in fit["rows"]} == {
        (k, t) for k in ("trNTK", "proj-pNTK") for t in ("labels", "distilled")}
    assert all(r["tau"] > 0.2 and r["acc"] > 0.8 for r in fit["rows"])
    for t in ("labels", "distilled"):
        assert (store / "proj-pNTK" / f"surrogate-{t}" / "zarr.json").is_file()

    assert _run("explain", cfg) == 0
    ex = json.loads((cli_project / "out" / "explained.json").read_text())
    assert [p["test_index"] for p in ex["points"]] == [7, 0, 3, 0]
    assert ex["points"][1] == ex["points"][3]  # the same test point, explained the same way
    p = ex["points"][0]
    assert len(p["target"]["proponents"]) == 3 and "true_label" in p
    # the streamed kernel rows are the stored test x train kernel: contributions W[c,i] K[x,i] add up to
    # the surrogate's logit of the explained class (minus its intercept)
    import zarr

    K = np.asarray(zarr.open_array(str(store / "proj-pNTK" / "K_test" / "kernel"), mode="r")[...], np.float64)
    g = zarr.open_group(str(store / "proj-pNTK" / "surrogate-distilled"), mode="r")
    W, b = np.asarray(g["class_coef"][...]), np.asarray(g["class_intercept"][...])
    c = p["target"]["class_index"]
    assert np.isclose(K[7] @ W[c] + b[c], p["target"]["logit"], rtol=1e-4, atol=1e-5)

    assert _run("attribute", cfg) == 0
    at = json.loads((cli_project / "out" / "attributed.json").read_text())
    S = np.load(cli_project / "out" / "attributed.npy")
    assert S.shape == (4, 60) and at["test_indices"] == [0, 1, 2, 3]
    assert at["proponents"][0] == np.argsort(-S[0], kind="stable")[:2].tolist()
    # with a projection the margin features go to a store and the estimator streams from it; a rerun
    # reuses the finished store and gives the same scores
    assert "attribute_from_store" in at["estimator"]
    assert (store / "attribution" / "train" / "zarr.json").is_file()
    assert _run("attribute", cfg) == 0
    assert np.array_equal(np.load(cli_project / "out" / "attributed.npy"), S)


def test_fit_before_featurize_says_what_to_run(tmp_path, cli_project, capsys) -> None:
    text = MLP_CONFIG.replace('checkpoint = "mlp.pt"', f'checkpoint = {str(cli_project / "mlp.pt")!r}')
    (tmp_path / "tl.toml").write_text(text)
    assert _run("fit", str(tmp_path / "tl.toml")) == 1
    assert "run `tangentlens featurize" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- reports
_REPORTS = {
    "tabular": ("make_mlp", "blobs", "", None),
    "image": ("make_cnn", "images", "[kernels.CK]\nkind = \"ck\"\n", "gallery.png"),
    "text": ("make_text_model", "reviews", "", "gallery.png"),
}


@pytest.mark.parametrize("view", list(_REPORTS))
def test_report_for_each_kind_of_input(view, tmp_path, capsys) -> None:
    factory, data, extra, gallery = _REPORTS[view]
    (tmp_path / "r.toml").write_text(
        f"python_path = [{str(EXAMPLE)!r}]\n[model]\nfactory = \"cli_example.models:{factory}\"\n"
        f"[data]\nfactory = \"cli_example.data:{data}\"\n[kernels.trNTK]\nkind = \"trntk\"\n{extra}"
        "[report]\nout = \"rep\"\ngallery_rows = 2\ntop_k = 2\n")
    assert _run("report", str(tmp_path / "r.toml")) == 0
    out = tmp_path / "rep"
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["data"]["inputs shown as"] == view
    assert results["images"] == ["scatter.png"] + ([gallery] if gallery else [])
    assert len(results["explanations"]["points"]) == results["meta"]["data"]["n_test"]
    html = (out / "index.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == len(results["images"]) and "digit" not in html
    assert "verdict" in capsys.readouterr().out
    if view == "text" and find_chromium() is not None:  # what a reader sees, offline
        check = check_page(out / "index.html")
        assert page_problems(check, min_images=len(results["images"])) == []


# ---------------------------------------------------------------------------------------- bad configs
_GOOD = {
    "model": 'factory = "cli_example.models:make_mlp"',
    "data": 'factory = "cli_example.data:blobs"',
    "kernels.trNTK": 'kind = "trntk"',
}


def _config(tmp_path: Path, change: dict[str, str | None], top: str = "") -> Path:
    tables = {**_GOOD, **change}
    text = f"python_path = [{str(EXAMPLE)!r}]\n{top}\n" + "".join(
        f"[{name}]\n{body}\n" for name, body in tables.items() if body is not None)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "change, top, message",
    [
        ({}, "colour = 3", "unknown key(s) ['colour']"),
        ({"model": 'factory = "cli_example.models:make_mlp"\nweights = "x.pt"'}, "",
         "[model] has unknown key"),
        ({"model": 'factory = "cli_example.models.make_mlp"'}, "", 'is not "package.module:function"'),
        ({"model": None}, "", "the [model] table is missing"),
        ({"model": 'factory = "cli_example.models:make_mlp"\ncheckpoint = "nowhere.pt"'}, "",
         "[model] checkpoint: "),
        ({"kernels.trNTK": 'kind = "trntk"\nmodules = ["0"]'}, "", "modules= applies only to"),
        ({"kernels.trNTK": 'kind = "ck"\nprojection = { dim = 8 }'}, "", "projection= applies only to"),
        ({"kernels.trNTK": 'kind = "trntk"\nprojection = { dims = 8 }'}, "", "projection has unknown key"),
        ({"kernels.trNTK": 'kind = "ntk"'}, "", "[kernels.trNTK]"),
        ({"kernels.trNTK": 'kind = "entk"'}, "", "'entk' gives C x C blocks"),
        ({"kernels.trNTK": None}, "", "add at least one [kernels.NAME] table"),
        ({"surrogate": 'targets = ["labels", "soft"]'}, "", "[surrogate] targets: expected a list"),
        ({"explain": "k = 0"}, "", "[explain] k: expected an integer >= 1"),
        ({"model": 'factory = "no_such_package.models:make"'}, "", "cannot import 'no_such_package.models'"),
        ({"model": 'factory = "cli_example.models:make_rnn"'}, "", "has no callable 'make_rnn'"),
        ({"model": 'factory = "cli_example.models:make_mlp"\noptions = { width = 3 }'}, "",
         "[model] options do not fit"),
        ({"model": 'factory = "cli_example.models:not_a_model"'}, "", "not a torch.nn.Module"),
        ({"data": 'factory = "cli_example.data:wrong_shape"'}, "", "y_train must be (N,) integer"),
    ],
)
def test_bad_config_exits_1_naming_the_key(change, top, message, tmp_path, capsys) -> None:
    assert _run("report", str(_config(tmp_path, change, top))) == 1
    err = capsys.readouterr().err
    assert err.startswith("tangentlens: error: ") and message in err, err


def test_bad_files(tmp_path, capsys) -> None:
    assert _run("fit", str(tmp_path / "missing.toml")) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x.toml").write_text("[model\nfactory = 1")
    assert _run("fit", str(tmp_path / "x.toml")) == 1
    assert "is not valid TOML" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="kernels"):  # the typed error behind the exit status
        load_config(_config(tmp_path, {"kernels.trNTK": None}))


def test_checkpoints_are_read_without_unpickling(tmp_path, capsys) -> None:
    sys.path.insert(0, str(EXAMPLE))
    try:
        import cli_example.models as models

        torch.save(models.make_mlp(hidden=16), tmp_path / "whole.pt")  # a pickled module, not a state dict
    finally:
        sys.path.remove(str(EXAMPLE))
    train_mlp(tmp_path / "narrow.pt", hidden=4)
    body = 'factory = "cli_example.models:make_mlp"\ncheckpoint = "{}"'
    assert _run("attribute", str(_config(tmp_path, {"model": body.format("whole.pt")}))) == 1
    assert "holds pickled Python objects" in capsys.readouterr().err
    assert _run("attribute", str(_config(tmp_path, {"model": body.format("narrow.pt")}))) == 1
    assert "does not fit the factory's model" in capsys.readouterr().err
    # trusting the file is an explicit choice
    trusted = body.format("whole.pt") + "\nweights_only = false"
    assert _run("attribute", str(_config(tmp_path, {"model": trusted, "attribute": "points = 2"}))) == 0


def test_an_unreachable_scheduler_exits_1_saying_so(cli_project, capsys) -> None:
    # (tests/test_distributed.py runs the commands on a real cluster)
    cfg = str(cli_project / "tl.toml")
    assert _run("featurize", cfg, "--scheduler", "tcp://127.0.0.1:1", "--resume") == 1
    err = capsys.readouterr().err
    assert "Cannot reach a dask scheduler at 'tcp://127.0.0.1:1'" in err or "tangentlens[distributed]" in err


def test_the_readme_example_is_the_config_example_and_valid(tmp_path) -> None:
    import re

    from tangentlens.cli.config import EXAMPLE

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    assert block == EXAMPLE
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model.pt").write_bytes(b"")
    (tmp_path / "tl.toml").write_text(block)
    cfg = load_config(tmp_path / "tl.toml")
    assert [k.name for k in cfg.kernels] == ["trNTK", "proj-pNTK"]
    assert cfg.kernel("proj-pNTK").config.projection.dim == 512
    assert cfg.store.path == tmp_path / "tangentlens-store" and cfg.explain.out.parent == cfg.store.path
