"""Counterfactual evaluation of data attribution: the linear datamodeling score (LDS).

The LDS (Park et al., 2023, "TRAK") asks whether an attribution matrix predicts what *retraining* does.
Draw M random subsets S_1..S_M of the N training points, each of size ``round(α·N)``, retrain the
model on each, and record every test target's output ``f_n(S_m)`` (TRAK's output is the margin
``z_y − logsumexp_{c≠y} z_c``, see :func:`margins`). An attribution ``τ`` (n_targets × N) predicts
``g_n(S) = Σ_{i∈S} τ(n, i)``; the LDS is the mean over targets n of the Spearman rank correlation over
m between ``g_n(S_m)`` and ``f_n(S_m)``.

Two pieces:

* :class:`SubsetRetrainer` draws the seeded subsets,
  calls the user's ``train_fn(indices, seed)`` and ``output_fn(model)`` on each, and returns the
  (M, N) masks and (M, n_targets) outputs as :class:`SubsetRuns`. With ``cache_dir`` every finished
  subset's outputs are written to the folder at once (atomically), so an interrupted run continues
  where it stopped without retraining the finished subsets.
* :func:`lds` scores any attribution matrix against those masks and outputs: mean ± standard error
  over targets, a seeded bootstrap confidence interval, and the per-target correlations.

The store itself (its layout, manifest and checks) is :mod:`tangentlens.lds_store`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .arrays import to_numpy
from .errors import InputError, NonFiniteError
from .faithfulness import log_odds64
from .lds_store import SubsetStore

__all__ = [
    "LDSResult",
    "SubsetRetrainer",
    "SubsetRuns",
    "lds",
    "margins",
    "subset_masks",
    "subset_train_seed",
]


# --------------------------------------------------------------------------------------------------
# Margins
# --------------------------------------------------------------------------------------------------
def margins(logits: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """TRAK's margin of each example, ``z_y − logsumexp_{c≠y} z_c``, in float64.

    It equals ``log p_y − log(1 − p_y)`` for ``p = softmax(z)`` but is computed without forming ``p``,
    so it does not saturate. For two classes it is ``z_y − z_other``; a single logit ``z`` per example
    (shape (n,) or (n, 1)) is read as the two logits ``[0, z]``, so the margin is ``z`` for label 1
    and ``−z`` for label 0. Use it as (part of) the ``output_fn`` of :class:`SubsetRetrainer`.

    Args:
        logits: (n, C) logits (numpy or torch, any float dtype; converted to float64 first), or (n,)
            / (n, 1) single logits.
        labels: (n,) integer class positions ``0..C-1``.

    Returns:
        (n,) float64 margins. Cost O(n·C).

    Raises:
        InputError: non-numeric, empty or non-finite logits; labels of the wrong length or out of
            range.
    """
    return log_odds64(logits, labels)


# --------------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------------
def _check_int(value: Any, name: str, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r} ({type(value).__name__}). {hint}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}. {hint}")
    return int(value)


def _check_settings(n_train: Any, n_subsets: Any, alpha: Any, seed: Any) -> tuple[int, int, float, int]:
    n_train = _check_int(n_train, "n_train", 2, "Pass the number of training points N (at least 2).")
    n_subsets = _check_int(
        n_subsets, "n_subsets", 2,
        "The LDS correlates over subsets, so pass M >= 2 (typical M is 50 to several hundred).",
    )
    seed = _check_int(seed, "seed", 0, "Pass a non-negative integer seed.")
    try:
        alpha_f = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"alpha must be a number in (0, 1), got {alpha!r}.") from None
    if not (0.0 < alpha_f < 1.0):
        raise InputError(
            f"alpha must lie strictly between 0 and 1 (the fraction of the training set in each "
            f"subset), got {alpha!r}; the usual choice is alpha=0.5."
        )
    k = int(round(alpha_f * n_train))
    if not (1 <= k <= n_train - 1):
        raise InputError(
            f"alpha={alpha_f} with n_train={n_train} gives subsets of {k} points; each subset must "
            f"keep at least 1 and leave out at least 1 point: choose alpha closer to 0.5."
        )
    return n_train, n_subsets, alpha_f, seed


def _subset_rng(seed: int, m: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(m, stream)))


def subset_train_seed(seed: int, m: int) -> int:
    """The training seed :class:`SubsetRetrainer` passes to ``train_fn`` for subset ``m``.

    A 31-bit integer drawn from ``SeedSequence(seed, spawn_key=(m, 1))``: a deterministic function of
    ``(seed, m)`` and independent of the subset's own draw (``spawn_key=(m, 0)``).
    """
    return int(_subset_rng(seed, m, 1).integers(0, 2**31 - 1))


def _subset_mask(n_train: int, alpha: float, seed: int, m: int) -> np.ndarray:
    k = int(round(alpha * n_train))
    # argsort of uniform doubles: depends only on the generator's double stream (stable across numpy
    # releases in practice); the manifest's hash catches any change anyway.
    chosen = np.argsort(_subset_rng(seed, m, 0).random(n_train), kind="stable")[:k]
    mask = np.zeros(n_train, dtype=bool)
    mask[chosen] = True
    return mask


def subset_masks(n_train: int, n_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """The M seeded α-subsets of ``range(n_train)`` as an (M, N) boolean mask.

    Subset m holds exactly ``round(α·N)`` points, chosen uniformly without replacement by a generator
    seeded with ``SeedSequence(seed, spawn_key=(m, 0))``; so row m is a deterministic function of
    ``(n_train, alpha, seed, m)`` alone (changing M keeps the first rows).

    Args:
        n_train: N, the number of training points (>= 2).
        n_subsets: M, the number of subsets (>= 2).
        alpha: Fraction of the training set in each subset, in (0, 1).
        seed: Non-negative integer seed.

    Returns:
        (M, N) bool. Cost O(M·N·log N) time, M·N bytes.

    Raises:
        InputError: N < 2, M < 2, alpha outside (0, 1) (or giving an empty or full subset), negative
            seed.
    """
    n_train, n_subsets, alpha, seed = _check_settings(n_train, n_subsets, alpha, seed)
    return np.stack([_subset_mask(n_train, alpha, seed, m) for m in range(n_subsets)])


# --------------------------------------------------------------------------------------------------
# Retraining harness
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubsetRuns:
    """Masks and recorded outputs of the retrained subsets.

    Attributes:
        masks: (M, N) bool, row m the training points of subset m.
        outputs: (M, n_targets) float64, ``outputs[m, n]`` the output of target n after training on
            subset m.
        alpha: Fraction of the training set in each subset.
        seed: The seed the subsets (and training seeds) were drawn from.
        n_trained: Subsets trained by the call that returned this (the rest were read from the store).
        n_loaded: Subsets read from the store instead of retrained.
    """

    masks: np.ndarray
    outputs: np.ndarray
    alpha: float
    seed: int
    n_trained: int
    n_loaded: int

    def lds(self, scores: ArrayLike, **kwargs: Any) -> LDSResult:
        """``lds(scores, self.masks, self.outputs, **kwargs)``; see :func:`lds`."""
        return lds(scores, self.masks, self.outputs, **kwargs)


def _as_outputs(value: Any, m: int, expected: int | None) -> np.ndarray:
    out = to_numpy(value)
    if out.dtype.kind not in "fiu":
        raise InputError(f"output_fn returned dtype {out.dtype} for subset {m}; return numeric outputs.")
    out = out.astype(np.float64)
    if out.ndim == 0:
        out = out.reshape(1)
    if out.ndim != 1 or out.shape[0] == 0:
        raise InputError(
            f"output_fn must return a 1-D array (n_targets,) (e.g. margins(logits, labels)), got shape "
            f"{out.shape} for subset {m}."
        )
    if expected is not None and out.shape[0] != expected:
        raise InputError(
            f"output_fn returned {out.shape[0]} outputs for subset {m} but {expected} for earlier subsets; "
            f"it must return the same targets, in the same order, for every model."
        )
    if not np.all(np.isfinite(out)):
        raise NonFiniteError(
            f"output_fn returned NaN or inf for subset {m} ({int(np.sum(~np.isfinite(out)))} of "
            f"{out.shape[0]} targets); check that the model trained (e.g. lower the learning rate) and "
            f"compute margins in float64 (tangentlens.lds.margins)."
        )
    return out


class SubsetRetrainer:
    """Retrain a model on M seeded α-subsets of its training set and record the targets' outputs.

    Subset m (see :func:`subset_masks`) is a deterministic function of ``(seed, m)``; the harness calls
    ``model = train_fn(indices, subset_train_seed(seed, m))`` with ``indices`` the subset's sorted
    training positions (int64), then ``output_fn(model)`` → (n_targets,) outputs, e.g. the margins of
    the test targets: ``lambda model: margins(model(x_test), y_test)``. The model is dropped as soon as
    its outputs are recorded.

    With ``cache_dir`` the outputs are stored as one small ``.npz`` per subset, written atomically as
    soon as that subset finishes, next to a ``manifest.json`` of the settings (N, α, M, seed and a
    SHA-256 of the subsets). Running again on the same folder reads the finished subsets and trains
    only the missing ones, so an interrupted run (an exception, Ctrl-C, a killed job) continues where it
    stopped. Opening a folder made with other settings raises :class:`StoreMismatchError` naming the
    fields that differ. The harness cannot see changes to ``train_fn`` or ``output_fn``: use a new
    folder when you change them.

    Cost: M calls of ``train_fn`` and ``output_fn`` (minus the stored ones), plus O(M·N) for the masks.

    Args:
        train_fn: ``train_fn(indices: np.ndarray, seed: int) -> model``.
        output_fn: ``output_fn(model) -> array (n_targets,)``; numpy or torch, converted to float64.
        n_train: N, the size of the full training set (>= 2).
        n_subsets: M, the number of subsets (>= 2).
        alpha: Fraction of the training set in each subset, in (0, 1); default 0.5 as in TRAK.
        seed: Non-negative integer seed of the subsets and training seeds.
        cache_dir: Folder for the resumable store (created if missing); ``None`` keeps everything in
            memory.
        progress: Show a tqdm progress bar on stderr.

    Raises:
        InputError: bad settings (N < 2, M < 2, alpha outside (0, 1), negative seed), or a subset file
            in ``cache_dir`` without a manifest.
        StoreMismatchError: ``cache_dir`` holds a store made with other settings, or a subset file that
            does not match its subset.
    """

    def __init__(
        self,
        train_fn: Callable[[np.ndarray, int], Any],
        output_fn: Callable[[Any], ArrayLike],
        n_train: int,
        n_subsets: int,
        *,
        alpha: float = 0.5,
        seed: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> None:
        if not callable(train_fn) or not callable(output_fn):
            raise InputError("train_fn and output_fn must be callables: train_fn(indices, seed) -> model, "
                             "output_fn(model) -> (n_targets,) array.")
        self.n_train, self.n_subsets, self.alpha, self.seed = _check_settings(n_train, n_subsets, alpha, seed)
        self.train_fn = train_fn
        self.output_fn = output_fn
        self.progress = progress
        self.masks = subset_masks(self.n_train, self.n_subsets, self.alpha, self.seed)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._store = None if self.cache_dir is None else SubsetStore(self.cache_dir, self.masks,
                                                                       alpha=self.alpha, seed=self.seed)
        self._outputs: dict[int, np.ndarray] = {} if self._store is None else self._store.load()

    @property
    def completed(self) -> list[int]:
        """Positions m of the subsets whose outputs are recorded (stored or trained in this process)."""
        return sorted(self._outputs)

    def run(self) -> SubsetRuns:
        """Train every subset not yet recorded and return all masks and outputs.

        Returns:
            :class:`SubsetRuns` with (M, N) masks and (M, n_targets) float64 outputs.

        Raises:
            InputError: ``output_fn`` returns something other than a 1-D numeric array, or a different
                number of outputs than for the other subsets.
            NonFiniteError: ``output_fn`` returns NaN or inf.
            Exception: whatever ``train_fn`` or ``output_fn`` raise, unchanged; the subsets finished
                before it are kept (in the store with ``cache_dir``), so calling :meth:`run` again
                continues from there.
        """
        from tqdm.auto import tqdm

        n_loaded = len(self._outputs)
        todo = [m for m in range(self.n_subsets) if m not in self._outputs]
        n_trained = 0
        with tqdm(total=self.n_subsets, initial=self.n_subsets - len(todo), desc="retrain subsets",
                  unit="subset", disable=not self.progress, file=sys.stderr, leave=False) as bar:
            for m in todo:
                indices = np.flatnonzero(self.masks[m]).astype(np.int64)
                model = self.train_fn(indices, subset_train_seed(self.seed, m))
                expected = next(iter(self._outputs.values())).shape[0] if self._outputs else None
                outputs = _as_outputs(self.output_fn(model), m, expected)
                del model
                if self._store is not None:
                    self._store.save(m, outputs)
                self._outputs[m] = outputs
                n_trained += 1
                bar.update(1)
        outputs = np.stack([self._outputs[m] for m in range(self.n_subsets)])
        return SubsetRuns(masks=self.masks.copy(), outputs=outputs, alpha=self.alpha, seed=self.seed,
                          n_trained=n_trained, n_loaded=n_loaded)


# --------------------------------------------------------------------------------------------------
# LDS
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LDSResult:
    """Linear datamodeling score of one attribution matrix.

    Attributes:
        mean: The LDS, mean over the used targets of the per-target Spearman correlations (NaN if no
            target is usable).
        se: Standard error of ``mean`` over targets, ``std(ddof=1) / sqrt(n_used)`` (NaN if
            ``n_used < 2``).
        ci_low: Lower end of the bootstrap confidence interval of ``mean`` (targets resampled with
            replacement; percentile interval).
        ci_high: Upper end of that interval.
        per_target: (n_targets,) float64 Spearman correlation of each target; NaN for excluded targets.
        n_targets: Targets given.
        n_used: Targets with a defined correlation (those in ``mean``).
        n_constant_outputs: Targets whose recorded outputs are the same on every subset (no ranking).
        n_constant_predictions: Targets whose predicted ``g_n(S_m)`` is the same on every subset (e.g.
            a zero or constant row of scores).
        excluded_reason: ``None`` when every target is used; otherwise a sentence giving the counts.
        n_subsets: M, subsets correlated over.
        confidence: Level of the bootstrap interval.
        n_bootstrap: Bootstrap resamples.
    """

    mean: float
    se: float
    ci_low: float
    ci_high: float
    per_target: np.ndarray = field(repr=False)
    n_targets: int
    n_used: int
    n_constant_outputs: int
    n_constant_predictions: int
    excluded_reason: str | None
    n_subsets: int
    confidence: float
    n_bootstrap: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict (``per_target`` as a list, NaN kept as float NaN)."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["per_target"] = [float(v) for v in self.per_target]
        return d

    def __str__(self) -> str:
        pct = f"{100 * self.confidence:g}%"
        s = (f"LDS {self.mean:.3f} ± {self.se:.3f} (SE over {self.n_used} targets; {pct} CI "
             f"[{self.ci_low:.3f}, {self.ci_high:.3f}]; M = {self.n_subsets} subsets)")
        return s if self.excluded_reason is None else f"{s}; {self.excluded_reason}"


def _as_float2d(x: Any, name: str, shape_hint: str) -> np.ndarray:
    a = to_numpy(x)
    if a.dtype.kind not in "fiub":
        raise InputError(f"{name} must be a numeric array {shape_hint}, got dtype {a.dtype}.")
    a = a.astype(np.float64)
    if a.ndim != 2:
        raise InputError(f"{name} must be 2-D {shape_hint}, got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} contains NaN or inf values; pass finite {name}.")
    return a


def _column_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b`` (average-rank ties)."""
    from scipy.stats import rankdata

    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(axis=0) / np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))


def lds(
    scores: ArrayLike,
    masks: ArrayLike,
    outputs: ArrayLike,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """Linear datamodeling score of an attribution matrix against retrained subsets.

    For target n and subset m the attribution predicts ``g_n(S_m) = Σ_{i∈S_m} scores[n, i]`` (i.e.
    ``G = masks @ scores.T``). The target's score is Spearman's ρ over m between ``g_n(S_m)`` and
    ``outputs[m, n]`` (Pearson correlation of the average ranks, float64); the LDS is the mean of ρ
    over targets, reported with its standard error over targets and a seeded bootstrap interval
    (targets resampled with replacement, percentile method). The score is invariant to any positive
    scaling of a target's row and to adding a constant to it (all subsets have the same size).

    A target whose outputs are identical on every subset, or whose predictions are (up to the
    rounding of the sum: spread ≤ 64·ε·Σ_i|scores[n, i]|), has no rank correlation: it is left out
    (NaN in ``per_target``) and counted in ``n_constant_outputs`` / ``n_constant_predictions``.

    Cost: O(M·N·n_targets) for the predictions, O(M·log M·n_targets) for the ranks,
    O(n_bootstrap·n_targets) for the interval; memory O(M·n_targets + N·n_targets).

    Args:
        scores: (n_targets, N) attribution: ``scores[n, i]`` the predicted effect of training point i
            on target n's output (numpy or torch; converted to float64).
        masks: (M, N) bool (or 0/1) subset membership, e.g. :attr:`SubsetRuns.masks`.
        outputs: (M, n_targets) output of each target after training on each subset, e.g.
            :attr:`SubsetRuns.outputs`.
        n_bootstrap: Bootstrap resamples for the interval (>= 1).
        confidence: Level of the interval, in (0, 1).
        seed: Seed of the bootstrap.

    Returns:
        :class:`LDSResult`.

    Raises:
        InputError: shapes that do not agree (the message says which), M < 2, non-boolean masks, NaN or
            inf values, bad ``n_bootstrap`` / ``confidence``.
    """
    S = _as_float2d(scores, "scores", "(n_targets, N)")
    mask_arr = to_numpy(masks)
    if mask_arr.ndim != 2:
        raise InputError(f"masks must be 2-D (M subsets, N training points), got shape {mask_arr.shape}.")
    if mask_arr.dtype != np.bool_:
        if mask_arr.dtype.kind not in "iuf" or not np.all((mask_arr == 0) | (mask_arr == 1)):
            raise InputError("masks must be boolean (or 0/1) subset membership, (M, N).")
        mask_arr = mask_arr.astype(bool)
    Y = _as_float2d(outputs, "outputs", "(M, n_targets)")
    M, N = mask_arr.shape
    if M < 2:
        raise InputError(f"masks has M={M} subsets; the LDS correlates over subsets, so pass M >= 2 "
                         f"(typical M is 50 to several hundred).")
    if Y.shape[0] != M:
        raise InputError(f"outputs has {Y.shape[0]} rows but masks has M={M} subsets; pass outputs "
                         f"(M, n_targets) with one row per subset.")
    if S.shape[1] != N:
        hint = (" It looks transposed: pass scores.T." if S.shape[0] == N and S.shape[1] == Y.shape[1]
                else "")
        raise InputError(f"scores has {S.shape[1]} columns but masks has N={N} training points; pass "
                         f"scores (n_targets, N) with one column per training point.{hint}")
    if S.shape[0] != Y.shape[1]:
        raise InputError(f"scores has {S.shape[0]} rows (targets) but outputs has {Y.shape[1]} columns; "
                         f"pass scores (n_targets, N) and outputs (M, n_targets) for the same targets.")
    n_bootstrap = _check_int(n_bootstrap, "n_bootstrap", 1, "Pass the number of bootstrap resamples.")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float, np.floating)) or not (
        0.0 < float(confidence) < 1.0
    ):
        raise InputError(f"confidence must be a number in (0, 1), got {confidence!r}; e.g. 0.95.")
    seed = _check_int(seed, "seed", 0, "Pass a non-negative integer seed.")

    G = mask_arr.astype(np.float64) @ S.T  # (M, n_targets)
    const_out = np.ptp(Y, axis=0) == 0
    tol = 64 * np.finfo(np.float64).eps * np.abs(S).sum(axis=1)
    const_pred = np.ptp(G, axis=0) <= tol
    rho = _column_spearman(G, Y)
    excluded = const_out | const_pred
    rho[excluded] = np.nan
    used = rho[~excluded]
    n_targets, n_used = S.shape[0], int(used.size)

    reason = None
    if excluded.any():
        parts = []
        if const_out.any():
            parts.append(f"{int(const_out.sum())} with the same output on every subset")
        if const_pred.any():
            parts.append(f"{int(const_pred.sum())} with the same predicted output on every subset "
                         f"(constant or zero rows of scores)")
        reason = (f"{int(excluded.sum())} of {n_targets} targets left out (no rank correlation): "
                  + "; ".join(parts))

    if n_used == 0:
        mean = se = lo = hi = math.nan
    else:
        mean = float(used.mean())
        se = float(used.std(ddof=1) / math.sqrt(n_used)) if n_used >= 2 else math.nan
        rng = np.random.default_rng(seed)
        boot = np.empty(n_bootstrap)
        chunk = max(1, 2**22 // n_used)
        for start in range(0, n_bootstrap, chunk):
            b = min(chunk, n_bootstrap - start)
            boot[start:start + b] = used[rng.integers(0, n_used, size=(b, n_used))].mean(axis=1)
        q = (1.0 - float(confidence)) / 2
        lo, hi = (float(v) for v in np.quantile(boot, [q, 1.0 - q]))

    return LDSResult(mean=mean, se=se, ci_low=lo, ci_high=hi, per_target=rho, n_targets=n_targets,
                     n_used=n_used, n_constant_outputs=int(const_out.sum()),
                     n_constant_predictions=int(const_pred.sum()), excluded_reason=reason, n_subsets=M,
                     confidence=float(confidence), n_bootstrap=n_bootstrap)
