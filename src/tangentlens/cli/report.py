"""``tangentlens report``: the demo's report for your own model and data, from a TOML config.

The steps are the demo's (:mod:`tangentlens.demo.run`) on the config's model, data and kernels, all in
memory: the network's logits on both splits; for every kernel of ``[report] kernels`` the train x train and
test x train blocks (:func:`tangentlens.train_test_kernels`); a kGLM per target of ``[surrogate] targets``
(true labels, distilled from the network's softmax); faithfulness of each (float64); the most faithful one
explains the network's predicted class on every test point; a verdict in words; figures (a confidence scatter,
and an image gallery or highlighted tokens, depending on the inputs); ``index.html`` and ``results.json``.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from ..api import train_test_kernels
from ..arrays import to_numpy
from ..demo import (
    EXPLANATION_COLUMNS,
    FAITHFULNESS_COLUMNS,
    SurrogateSpec,
    explanation_table,
    verdict_in_words,
)
from ..errors import InputError
from ..explain import explain
from ..faithfulness import faithfulness
from ..report import gallery_points, text_table, write_report
from .config import KernelSection, RunConfig
from .figures import confidence_figure, image_gallery, input_view, text_gallery
from .loading import UserData, build_model, load_data, network_logits

__all__ = ["kernel_label_options", "run_report", "surrogate_specs"]


def surrogate_specs(targets: Sequence[str]) -> tuple[SurrogateSpec, ...]:
    """The demo's exact L-BFGS kGLMs for the config's targets: ``"labels"`` (true labels) and
    ``"distilled"`` (the network's softmax probabilities)."""
    specs = {"labels": SurrogateSpec("labels", "labels", "lbfgs"),
             "distilled": SurrogateSpec("distilled", "soft", "lbfgs")}
    return tuple(specs[t] for t in targets)


def kernel_label_options(ks: KernelSection, data: UserData) -> dict[str, Any]:
    """``labels=`` / ``test_labels=`` for the label kinds (the kernel table's label mode on both sides)."""
    if not ks.config.spec.needs_labels:
        return {}
    if ks.labels == "predicted":
        return {"labels": "predicted", "test_labels": "predicted"}
    return {"labels": data.y_train, "test_labels": data.y_test}


def _words(text: str) -> str:
    """The demo's words for digits, said of any test point."""
    return text.replace("the demo's ", "the ").replace("test digits", "test points") \
        .replace("test digit", "test point").replace("digits", "points").replace("digit", "point")


def _bar(items: Sequence[Any], desc: str, unit: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, disable=not progress, file=sys.stderr, leave=False)


def run_report(cfg: RunConfig, *, out: Path | None = None, progress: bool = True,
               stdout: TextIO | None = None) -> Path:
    """Compute everything the report shows and write it (``index.html``, ``results.json``, PNG figures).

    Args:
        cfg: the validated config.
        out: the report folder (default ``[report] out``).
        progress: show progress bars on stderr.
        stdout: where the table and the log go (default ``sys.stdout``).

    Returns:
        The path of ``index.html``. Cost: per kernel one :func:`tangentlens.train_test_kernels` pass (N²/2 +
        T·N block pairs) and the kGLM fits on the N x N block; memory: the N x N blocks in float64.

    Raises:
        ConfigError: a bad config, factory or checkpoint.
        TangentLensError: from the kernels, surrogates or metrics.
    """
    log = stdout if stdout is not None else sys.stdout
    folder = Path(out) if out is not None else cfg.report.out
    if folder.exists() and not folder.is_dir():
        raise InputError(f"the report folder {str(folder)!r} exists and is not a folder; choose another.")
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    model, data = build_model(cfg), load_data(cfg)
    t0 = time.perf_counter()
    z_train, z_test = network_logits(model, data.x_train), network_logits(model, data.x_test)
    timings["network logits"] = time.perf_counter() - t0
    y_train, y_test = data.y_train.numpy(), data.y_test.numpy()
    C = z_test.shape[1]
    if max(int(y_train.max()), int(y_test.max())) >= C:
        raise InputError(f"labels go up to {max(int(y_train.max()), int(y_test.max()))} but the network has "
                         f"{C} outputs; labels must be class positions 0..{C - 1}.")
    accuracy = float((z_test.argmax(1) == y_test).mean())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tangentlens report: {cfg.model.factory.text} ({n_params} parameters), {len(y_train)} train / "
          f"{len(y_test)} test, network test accuracy {100 * accuracy:.2f}%", file=log, flush=True)

    kernels: list[tuple[str, np.ndarray, np.ndarray, float]] = []
    bar = _bar(cfg.report.kernels, "kernels", "kernel", progress)
    for name in bar:
        bar.set_postfix_str(name)
        ks = cfg.kernel(name)
        t0 = time.perf_counter()
        K, Kt = train_test_kernels(model, data.x_train, data.x_test, config=ks.config,
                                   **kernel_label_options(ks, data))
        kernels.append((name, to_numpy(K, np.float64), to_numpy(Kt, np.float64), time.perf_counter() - t0))
    bar.close()
    timings["kernels"] = sum(k[3] for k in kernels)

    specs = surrogate_specs(cfg.surrogate.targets)
    alpha = cfg.report.alpha
    rows, results, fits = [], [], []
    bar = _bar([(s, k) for s in specs for k in kernels], "surrogates", "fit", progress)
    for spec, (name, K, Kt, secs) in bar:
        bar.set_postfix_str(f"{name}/{spec.name}")
        t0 = time.perf_counter()
        sur = spec.fit(K, y_train, z_train, alpha=alpha, seed=0)
        fit_s = time.perf_counter() - t0
        scores = sur.comparison_logits(Kt)
        res = faithfulness(z_test, scores, y_test)
        fits.append((name, spec, sur, Kt, scores))
        results.append(res)
        rows.append({"kernel": name, "target": spec.name, "tau": res.tau, "TAD (pp)": 100.0 * res.tad,
                     "Gamma": res.gamma, "p": res.gamma_p, "R2": res.r2, "acc": res.surrogate_acc,
                     "kernel s": secs, "fit s": fit_s})
    bar.close()
    timings["surrogate fits"] = sum(r["fit s"] for r in rows)
    table = text_table(rows, digits=4)
    notes = [f"Gamma of {r['kernel']} / {r['target']}: {res.gamma_reason}."
             for r, res in zip(rows, results) if res.gamma_reason]
    print(table, *notes, sep="\n", file=log, flush=True)

    best = max(range(len(rows)), key=lambda i: rows[i]["tau"])
    name, spec, sur, Kt, _ = fits[best]
    k = min(cfg.report.top_k, len(y_train))
    expl = explain(sur, Kt, k=k, train_labels=y_train, network_logits=z_test, target="network", classes=())
    shown = gallery_points(y_test, z_test.argmax(1), cfg.report.gallery_rows,
                           np.array([p.predicted_index for p in expl]))
    verdict = _words(verdict_in_words(rows, specs, alpha, expl, shown))
    print(f"verdict: {verdict}", file=log, flush=True)

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    main = "trNTK" if "trNTK" in [k[0] for k in kernels] else kernels[0][0]
    images.append(confidence_figure(
        folder / "scatter.png", main, {f[1].name: f[4] for f in fits if f[0] == main},
        {r["target"]: r["tau"] for r in rows if r["kernel"] == main}, z_test, y_test))
    view = input_view(data, cfg.data.inputs)
    words = f"{name} / {spec.name}, τ = {rows[best]['tau']:.3f}"
    points = [expl[i] for i in shown]
    if view == "image":
        images.append(image_gallery(folder / "gallery.png", data, points, k, words))
    elif view == "text":
        images.append(text_gallery(folder / "gallery.png", data, points, k, words))
    timings["figures"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    meta = _meta(cfg, data, n_params, accuracy, kernels, specs, alpha, timings, view)
    index = _write(folder, cfg, rows, results, images, meta, notes, verdict, expl, shown, y_test, name,
                   spec.name, n_params, accuracy)
    print(f"report: {index}  ({timings['total']:.1f} s)", file=log, flush=True)
    return index


def _meta(cfg: RunConfig, data: UserData, n_params: int, accuracy: float, kernels: list[Any],
          specs: Sequence[SurrogateSpec], alpha: float, timings: dict[str, float], view: str
          ) -> dict[str, Any]:
    import scipy
    import sklearn

    from .. import __version__

    checkpoint = str(cfg.model.checkpoint) if cfg.model.checkpoint else "(the factory's weights)"
    return {
        "tangentlens": __version__,
        "command": f"tangentlens report {cfg.path}",
        "model": {"factory": cfg.model.factory.text, "options": cfg.model.factory.options,
                  "checkpoint": checkpoint,
                  "parameters": n_params, "test accuracy": accuracy},
        "data": {"factory": cfg.data.factory.text, "options": cfg.data.factory.options,
                 "n_train": data.n_train, "n_test": data.n_test, "inputs shown as": view},
        "kernels": {name: _describe(cfg.kernel(name)) for name, *_ in kernels},
        "surrogates": {s.name: s.describe(alpha) for s in specs},
        "timings (s)": {key: round(v, 3) for key, v in timings.items()},
        "kernel timings (s)": {name: round(secs, 3) for name, _, _, secs in kernels},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "scipy": scipy.__version__, "scikit-learn": sklearn.__version__},
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def _describe(ks: KernelSection) -> str:
    """One line: the kernel's non-default settings."""
    cfg = ks.config
    parts = [f"kind={cfg.kind}", f"normalized={cfg.normalized}"]
    if cfg.projection is not None:
        p = cfg.projection
        parts.append(f"projection={p.kind}(dim={p.dim}, seed={p.seed})")
    for field in ("parameters", "probes", "modules", "dtype"):
        if getattr(cfg, field) is not None:
            parts.append(f"{field}={getattr(cfg, field)}")
    if cfg.spec.needs_labels:
        parts.append(f"labels={ks.labels}")
    return ", ".join(parts)


def _write(folder: Path, cfg: RunConfig, rows: list[dict[str, Any]], results: list[Any], images: list[Any],
           meta: dict[str, Any], notes: list[str], verdict: str, expl: Any, shown: list[int],
           y_test: np.ndarray, kernel: str, target: str, n_params: int, accuracy: float) -> Path:
    table = [{("test point" if c == "test digit" else c): v for c, v in r.items()}
             for r in explanation_table((expl[i] for i in shown), y_test)]
    columns = {("test point" if c == "test digit" else c): _words(d) for c, d in EXPLANATION_COLUMNS.items()}
    report_notes = [
        "Surrogates ('target' column): 'labels' are exact multinomial kGLMs (L-BFGS) fitted on the true "
        "training labels, 'distilled' the same fitted on the network's softmax probabilities. All metrics "
        "are computed in float64 (tangentlens.faithfulness) from each surrogate's comparison_logits.",
        *notes,
    ]
    return write_report(
        folder, rows, images, meta,
        title=cfg.report.title or f"tangentlens report: kernel surrogates of {cfg.model.factory.function}",
        intro=(f"A {n_params}-parameter network ({cfg.model.factory.text}) on {meta['data']['n_train']} "
               f"training points (test accuracy {100 * accuracy:.2f}%), explained by kernel machines on its "
               "kernels."),
        notes=report_notes, verdict=verdict,
        columns={c: _words(d) for c, d in FAITHFULNESS_COLUMNS.items()},
        tables=[(f"Explanations of the network's decisions ({kernel} / {target}, top {expl.k})", table,
                 columns)],
        extra={
            "most_faithful": {"kernel": kernel, "target": target, "tau": max(r["tau"] for r in rows)},
            "faithfulness": [{"kernel": r["kernel"], "target": r["target"], **res.to_dict()}
                             for r, res in zip(rows, results)],
            "explanations": {"surrogate": {"kernel": kernel, "target": target}, "target": "network",
                             "k": expl.k, "gallery": shown, "disagreements": expl.disagreements,
                             "points": [{"true_label": int(y_test[p.test_index]), **p.to_dict()}
                                        for p in expl]},
        },
    )
