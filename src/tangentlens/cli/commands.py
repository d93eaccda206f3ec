"""``tangentlens featurize | kernel | fit | explain | attribute``: your model's pipeline on disk.

Every kernel ``NAME`` of the config has a folder ``<store>/NAME`` holding::

    train/, test/         feature stores (tangentlens.store.FeatureStore) of the two splits     (featurize)
    K_train/, K_test/     the N x N and T x N kernels, out of core (tangentlens.store.KernelStore)   (kernel)
    surrogate-labels/, surrogate-distilled/
                          the fitted kGLM (tangentlens.store.SurrogateStore: class_coef, class_intercept, ...)
                                                                                              (fit)

``fit`` fits the kGLM from the stored features without the N x N kernel
(:class:`~tangentlens.surrogate.primal.PrimalKernelSurrogate`) when the features have at most N dimensions,
otherwise the exact dual kGLM on the stored ``K_train`` (computed when missing); it scores faithfulness on
the test features and writes ``<store>/fit.json``. ``explain`` streams test x train kernel rows from the
feature stores (never N x N) for the configured test points. ``attribute`` with ``[attribute] projection``
writes the training set's projected margin features to ``<store>/attribution/train`` (resumable) and
streams TRAK's primal D x D estimator from it (:func:`tangentlens.attribute_from_store`: memory D² plus
T x N scores, whatever N); without a projection it runs the exact :func:`tangentlens.attribute` in memory
(the N x N margin kernel).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from ..attribution import attribute, top_attributions
from ..errors import InputError, StoreMismatchError
from ..explain import explain
from ..faithfulness import faithfulness, softmax64
from ..inputs import Batch, batch_size_of
from ..report import text_table
from .config import KernelSection, RunConfig
from .loading import UserData, build_model, load_data, network_logits

__all__ = [
    "attribute_command",
    "explain_command",
    "featurize_command",
    "fit_command",
    "kernel_command",
    "load_surrogate",
]

_EXPLAIN_ROWS = 256  # test points per streamed block of kernel rows


@contextlib.contextmanager
def _progress(desc: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, unit="block", disable=not enabled, file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def _selected(cfg: RunConfig, names: Sequence[str] | None) -> list[KernelSection]:
    return list(cfg.kernels) if not names else [cfg.kernel(n) for n in names]


def _labels(ks: KernelSection, data: UserData, split: str) -> Any:
    """``labels=`` of one split for the label kinds (None for the others)."""
    if not ks.config.spec.needs_labels:
        return None
    if ks.labels == "predicted":
        return "predicted"
    return data.y_train if split == "train" else data.y_test


def _refuse_existing(path: Path, resume: bool) -> None:
    if path.exists() and not resume:
        raise InputError(f"{str(path)!r} already exists; pass --resume to continue it (or reuse it if it is "
                         "complete), or delete it to start over.")


def _open_features(cfg: RunConfig, name: str, split: str) -> Any:
    from ..store import FeatureStore

    path = cfg.kernel_dir(name) / split
    if not path.exists():
        raise InputError(f"no {split} features of kernel {name!r} at {str(path)!r}; run `tangentlens "
                         f"featurize {cfg.path}` first.")
    return FeatureStore.open(path)


# ----------------------------------------------------------------------------------------------------------
# featurize, kernel
# ----------------------------------------------------------------------------------------------------------
def _cluster(scheduler: str | None) -> Any:
    """A context giving a dask Client for ``scheduler`` (``None`` without one)."""
    if scheduler is None:
        return contextlib.nullcontext(None)
    from ..store.distributed import connect

    return connect(scheduler)


def featurize_command(cfg: RunConfig, *, kernels: Sequence[str] | None = None, resume: bool = False,
                      progress: bool = True, stdout: TextIO | None = None,
                      scheduler: str | None = None) -> list[Path]:
    """Feature rows of the training and test inputs of every kernel, into ``<store>/NAME/train|test``.

    Resumable: with ``resume`` an interrupted store is continued (finished chunks kept) and a complete one
    reused; the configuration, model and data must be those it was made with.

    With ``scheduler`` (a dask.distributed address) every chunk is a task on the cluster: the workers
    rebuild the model from ``[model]`` factory + checkpoint (a :class:`~tangentlens.ModelRecipe` of this
    config; the factory's module must be importable and the checkpoint and store readable at the same
    paths there) and write their chunks into the store; the stores are bit-identical to one process's.

    Returns:
        The feature stores' folders. Cost: :func:`tangentlens.featurize`'s per store.

    Raises:
        InputError: a store exists and ``resume`` is False, or the scheduler cannot be reached;
            ConfigError: a bad config.
        StoreMismatchError: ``resume`` on a store made with another config, model or data.
    """
    from ..store import ModelRecipe, featurize

    log = stdout if stdout is not None else sys.stdout
    selected = _selected(cfg, kernels)
    data = load_data(cfg)
    # on a cluster the client and every worker build the model from the config (the recipe pickles the
    # config, not the model); in one process it is built once
    model: Any = ModelRecipe(functools.partial(build_model, cfg)) if scheduler else build_model(cfg)
    written = []
    with _cluster(scheduler) as client:
        for ks in selected:
            for split, x in (("train", data.x_train), ("test", data.x_test)):
                path = cfg.kernel_dir(ks.name) / split
                _refuse_existing(path, resume)
                t0 = time.perf_counter()
                with _progress(f"featurize {ks.name}/{split}", progress) as cb:
                    fs = featurize(model, x, path, labels=_labels(ks, data, split), config=ks.config,
                                   resume=True, model_id=cfg.model.id, chunk_rows=cfg.store.chunk_rows,
                                   progress=cb, scheduler=client)
                print(f"featurize {ks.name}/{split}: {fs.n} rows of shape {fs.row_shape} ({fs.dtype}) -> "
                      f"{path} ({time.perf_counter() - t0:.1f} s)", file=log, flush=True)
                written.append(path)
    return written


def kernel_command(cfg: RunConfig, *, kernels: Sequence[str] | None = None, resume: bool = False,
                   progress: bool = True, stdout: TextIO | None = None,
                   scheduler: str | None = None) -> list[Path]:
    """The train x train and test x train kernels of every kernel from its feature stores, written block by
    block into ``<store>/NAME/K_train`` and ``K_test`` (never the whole N x N in memory).

    With ``scheduler`` (a dask.distributed address) every block is a task on the cluster, written by the
    worker into the kernel store (the same bytes as in one process).

    Returns:
        The kernel stores' folders. Cost: :func:`tangentlens.kernel_from_store`'s, 2·N·(N/2 + T)·D flops.

    Raises:
        InputError: no feature store (run ``featurize`` first), a kernel store exists without ``resume``,
            or the scheduler cannot be reached.
    """
    from ..store import kernel_from_store

    log = stdout if stdout is not None else sys.stdout
    written = []
    with _cluster(scheduler) as client:
        for ks in _selected(cfg, kernels):
            train, test = _open_features(cfg, ks.name, "train"), _open_features(cfg, ks.name, "test")
            for out_name, b in (("K_train", None), ("K_test", train)):
                a = train if b is None else test
                path = cfg.kernel_dir(ks.name) / out_name
                _refuse_existing(path, resume)
                t0 = time.perf_counter()
                with _progress(f"kernel {ks.name}/{out_name}", progress) as cb:
                    kstore = kernel_from_store(a, b, out=path, block_rows=cfg.store.block_rows, resume=True,
                                               progress=cb, scheduler=client)
                print(f"kernel {ks.name}/{out_name}: {kstore.shape} -> {path} "
                      f"({time.perf_counter() - t0:.1f} s)", file=log, flush=True)
                written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------
def load_surrogate(cfg: RunConfig, kernel: str, target: str) -> tuple[Any, dict[str, Any]]:
    """The kGLM that ``fit`` stored for ``kernel`` and ``target`` (a
    :class:`~tangentlens.store.SurrogateStore` under ``<store>/KERNEL/surrogate-TARGET``), and its ``meta``
    (kernel, target, solver, alpha, ``normalized``: test rows are cosine-normalized before the product, the
    test feature store's identity).

    Raises:
        InputError: nothing stored there (run ``fit`` first).
        StoreMismatchError: it was fitted on other feature stores than those in the store now.
    """
    from ..store import SurrogateStore

    path = cfg.kernel_dir(kernel) / f"surrogate-{target}"
    if not (path / "zarr.json").is_file():
        raise InputError(f"no fitted {target!r} surrogate of kernel {kernel!r} at {str(path)!r}; run "
                         f"`tangentlens fit {cfg.path}` first.")
    saved = SurrogateStore.open(path)
    train = _open_features(cfg, kernel, "train")
    try:
        return saved.estimator(train=train), saved.meta
    except StoreMismatchError as e:
        raise StoreMismatchError(f"{e} (rerun `tangentlens fit {cfg.path}`)") from None


def _targets(target: str, y_train: np.ndarray, z_train: np.ndarray) -> np.ndarray:
    return y_train if target == "labels" else softmax64(z_train)


def fit_command(cfg: RunConfig, *, kernels: Sequence[str] | None = None, progress: bool = True,
                stdout: TextIO | None = None) -> list[dict[str, Any]]:
    """Fit a kGLM per kernel and target from the stored features, score its faithfulness on the test
    features, store its coefficients and write ``<store>/fit.json``.

    Returns:
        The faithfulness table's rows. Cost (primal): N·D² + D³ once, then N·D·C per L-BFGS evaluation;
        (dual): the N x N kernel in memory and N²·C per evaluation.

    Raises:
        InputError: missing feature stores (run ``featurize`` first).
    """
    from ..store import kernel_from_store, save_surrogate
    from ..surrogate import KernelSurrogate
    from ..surrogate.primal import PrimalKernelSurrogate

    log = stdout if stdout is not None else sys.stdout
    model, data = build_model(cfg), load_data(cfg)
    z_train, z_test = network_logits(model, data.x_train), network_logits(model, data.x_test)
    y_train, y_test = data.y_train.numpy(), data.y_test.numpy()
    s = cfg.surrogate
    rows, metrics = [], []
    jobs = [(ks, t) for ks in _selected(cfg, kernels) for t in s.targets]
    with _progress("fit", progress) as cb:
        cb(0, len(jobs))
        for j, (ks, target) in enumerate(jobs):
            train, test = _open_features(cfg, ks.name, "train"), _open_features(cfg, ks.name, "test")
            if (train.n, test.n) != (len(y_train), len(y_test)):
                raise StoreMismatchError(
                    f"the feature stores of {ks.name!r} hold {train.n} / {test.n} rows but the data has "
                    f"{len(y_train)} / {len(y_test)} examples; rerun `tangentlens featurize` on this data.")
            norm = train.config.normalized
            D = int(np.prod(train.row_shape))
            solver = s.solver if s.solver != "auto" else ("primal" if D <= train.n else "dual")
            t0 = time.perf_counter()
            if solver == "primal":
                sur: Any = PrimalKernelSurrogate(alpha=s.alpha, normalize=norm, max_iter=s.max_iter)
                sur.fit(train.features, _targets(target, y_train, z_train))
                scores = sur.comparison_logits(test.features)
            else:
                # the kernel stores of `tangentlens kernel`, computed (or finished) here when missing
                kdir, rows_ = cfg.kernel_dir(ks.name), cfg.store.block_rows
                K = kernel_from_store(train, out=kdir / "K_train", block_rows=rows_, resume=True)
                Kt = kernel_from_store(test, train, out=kdir / "K_test", block_rows=rows_, resume=True)
                options = {} if s.max_iter is None else {"max_iter": s.max_iter}
                sur = KernelSurrogate(alpha=s.alpha, random_state=0, **options)
                sur.fit(K[...].astype(np.float64), _targets(target, y_train, z_train))
                scores = sur.comparison_logits(Kt[...].astype(np.float64))
            seconds = time.perf_counter() - t0
            save_surrogate(cfg.kernel_dir(ks.name) / f"surrogate-{target}", sur, train=train, overwrite=True,
                           meta={"kernel": ks.name, "target": target, "solver": solver, "alpha": s.alpha,
                                 "normalized": norm, "test": test.identity})
            res = faithfulness(z_test, scores, y_test)
            metrics.append({"kernel": ks.name, "target": target, **res.to_dict()})
            rows.append({"kernel": ks.name, "target": target, "solver": solver, "tau": res.tau,
                         "TAD (pp)": 100.0 * res.tad, "Gamma": res.gamma, "R2": res.r2,
                         "acc": res.surrogate_acc, "fit s": seconds})
            cb(j + 1, len(jobs))
    print(text_table(rows, digits=4), file=log, flush=True)
    out = cfg.store.path / "fit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable({"config": str(cfg.path), "rows": rows, "faithfulness": metrics}),
                              indent=2) + "\n", encoding="utf-8")
    print(f"fit: {out}", file=log, flush=True)
    return rows


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if np.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


# ----------------------------------------------------------------------------------------------------------
# explain, attribute
# ----------------------------------------------------------------------------------------------------------
def _points(points: tuple[int, ...] | int, n_test: int, where: str) -> np.ndarray:
    if isinstance(points, int):
        return np.arange(min(points, n_test))
    idx = np.asarray(points, dtype=np.int64)
    if idx.max() >= n_test:
        raise InputError(f"{where} points: index {int(idx.max())} is out of range; the test set has {n_test} "
                         "points.")
    return idx


def _take(x: Batch, idx: np.ndarray) -> Batch:
    t = torch.as_tensor(idx)
    return x[t] if isinstance(x, torch.Tensor) else {k: v[t] for k, v in x.items()}


def _kernel_rows(test: Any, train: Any, idx: np.ndarray, normalized: bool, block: int) -> np.ndarray:
    """K[idx, :] = ⟨φ(test_i), φ(train_j)⟩ (cosine with ``normalized``), streamed over training blocks."""
    uniq, inverse = np.unique(idx, return_inverse=True)  # zarr reads sorted, distinct rows
    rows = np.asarray(test.features.oindex[uniq], dtype=np.float64)[inverse]
    if normalized:
        sq = np.asarray(test.sqnorms.oindex[uniq], dtype=np.float64)[inverse]
        rows *= np.divide(1.0, np.sqrt(sq), out=np.zeros_like(sq), where=sq > 0)[:, None]
    K = np.empty((len(idx), train.n))
    for start, B in train.iter_blocks(block, normalized=normalized):
        K[:, start:start + len(B)] = rows @ B.astype(np.float64).T
    return K


def explain_command(cfg: RunConfig, *, progress: bool = True, stdout: TextIO | None = None) -> Path:
    """Explain the network's predicted class on ``[explain] points`` test points with the stored kGLM of
    ``[explain] kernel`` / ``target``: top-k proponents and opponents and their coverage, written as JSON.

    Kernel rows come from the feature stores, ``_EXPLAIN_ROWS`` test points at a time (T·N, never N x N).

    Returns:
        The JSON file. Cost: per block of test points one pass over the training features (rows·N·D flops).

    Raises:
        InputError: no fitted surrogate or feature store (run ``featurize`` and ``fit`` first).
    """
    log = stdout if stdout is not None else sys.stdout
    e = cfg.explain
    model, data = build_model(cfg), load_data(cfg)
    sur, meta = load_surrogate(cfg, e.kernel, e.target)
    train, test = _open_features(cfg, e.kernel, "train"), _open_features(cfg, e.kernel, "test")
    idx = _points(e.points, data.n_test, f"{cfg.path}: [explain]")
    y_train, y_test = data.y_train.numpy(), data.y_test.numpy()
    block = max(1, min(train.n, 2**22 // max(1, int(np.prod(train.row_shape)))))
    points: list[dict[str, Any]] = []
    disagreements: list[int] = []
    with _progress(f"explain {e.kernel}/{e.target}", progress) as cb:
        steps = range(0, len(idx), _EXPLAIN_ROWS)
        cb(0, len(steps))
        for j, s in enumerate(steps):
            part = idx[s:s + _EXPLAIN_ROWS]
            K = _kernel_rows(test, train, part, bool(meta["normalized"]), block)
            z = network_logits(model, _take(data.x_test, part))
            ex = explain(sur, K, k=min(e.k, train.n), train_labels=y_train, network_logits=z,
                         target="network", classes=())
            for p in ex:
                d = p.to_dict()
                d["test_index"] = int(part[p.test_index])
                d["true_label"] = int(y_test[part[p.test_index]])
                points.append(d)
            disagreements += [int(part[i]) for i in ex.disagreements]
            cb(j + 1, len(steps))
    e.out.parent.mkdir(parents=True, exist_ok=True)
    e.out.write_text(json.dumps(_jsonable({
        "kernel": e.kernel, "target": e.target, "explained": "the network's predicted class", "k": e.k,
        "n_points": len(points), "disagreements": disagreements, "points": points}), indent=2) + "\n",
        encoding="utf-8")
    agree = len(points) - len(disagreements)
    print(f"explain {e.kernel}/{e.target}: {len(points)} test points ({agree} where network and surrogate "
          f"agree) -> {e.out}", file=log, flush=True)
    return e.out


def attribute_command(cfg: RunConfig, *, progress: bool = True, stdout: TextIO | None = None) -> Path:
    """Counterfactual attribution (TRAK's estimator on the margin kernel) of ``[attribute] points`` test
    points: the top-k training points whose removal would lower (proponents) or raise (opponents) each
    margin, as JSON, and the full (T, N) scores next to it (``.npy``).

    With ``[attribute] projection`` the training set's projected margin features go to the feature store
    ``<store>/attribution/train`` (chunk by chunk, resumed when it exists for this model, data and
    projection), q_i = 1 − p_{y_i}(x_i) comes from one streamed forward pass, and the scores are streamed
    from the store (:func:`tangentlens.attribute_from_store`); without one, :func:`tangentlens.attribute`
    computes the exact margin kernel in memory.

    Returns:
        The JSON file. Cost: with a projection, the margin features (one forward and one backward per
        example) and N·D² + D³/3 + T·N·D flops, memory D² + T·N; without, the N x N margin kernel and
        N³/3 + T·N² flops.

    Raises:
        StoreMismatchError: ``<store>/attribution/train`` holds features of another model, data or
            projection (remove it, or point ``[store] path`` elsewhere).
    """
    log = stdout if stdout is not None else sys.stdout
    a = cfg.attribute
    model, data = build_model(cfg), load_data(cfg)
    idx = _points(a.points, data.n_test, f"{cfg.path}: [attribute]")
    x_test = _take(data.x_test, idx)
    true = a.labels == "true"
    train_labels: Any = data.y_train if true else "predicted"
    test_labels: Any = data.y_test[torch.as_tensor(idx)] if true else "predicted"
    if a.projection is None:
        with _progress("attribute", progress) as cb:
            cb(0, 1)
            S = attribute(model, data.x_train, x_test, labels=train_labels, test_labels=test_labels,
                          lam=a.lam)
            cb(1, 1)
        estimator = "tangentlens.attribute (TRAK's estimator on the exact margin kernel)"
    else:
        from ..api import features
        from ..attribution_core import attribution_q
        from ..store import featurize
        from ..store.attribute import attribute_from_store

        z_train = network_logits(model, data.x_train)
        y_train = torch.as_tensor(data.y_train) if true else torch.as_tensor(z_train).argmax(1)
        if true:
            y_test = torch.as_tensor(test_labels)
        else:
            y_test = torch.as_tensor(network_logits(model, x_test)).argmax(1)
        with _progress("attribute: margin features", progress) as cb:
            fs = featurize(model, data.x_train, cfg.store.path / "attribution" / "train", kind="margin",
                           labels=y_train, projection=a.projection, normalize=False, model_id=cfg.model.id,
                           chunk_rows=cfg.store.chunk_rows, progress=cb)
        F_test = features(model, x_test, kind="margin", labels=y_test, projection=a.projection,
                          normalize=False)
        S = attribute_from_store(fs, F_test, q=attribution_q(z_train, y_train), lam=a.lam)
        estimator = (f"tangentlens.attribute_from_store (TRAK's estimator on margin features projected to "
                     f"{a.projection.dim} dimensions, streamed from {fs.path})")
    top = top_attributions(S, k=min(a.k, batch_size_of(data.x_train)))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    scores = a.out.with_suffix(".npy")
    np.save(scores, S.double().cpu().numpy(), allow_pickle=False)
    a.out.write_text(json.dumps(_jsonable({
        "estimator": estimator, "labels": a.labels, "test_indices": idx.tolist(),
        "k": top.proponents.shape[1], "scores_file": scores.name, **top.to_dict()}), indent=2) + "\n",
        encoding="utf-8")
    print(f"attribute: {len(idx)} test points x {S.shape[1]} training points -> {a.out} (scores: {scores})",
          file=log, flush=True)
    return a.out
