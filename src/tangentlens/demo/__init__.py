"""The main job: train a small CNN on the bundled digits, explain it with kernel surrogates, write a report.

Steps (each seeded; the same seed gives the same table), one function each in :mod:`tangentlens.demo.run`:

1. data: a stratified split of scikit-learn's 8x8 digits
   (:func:`tangentlens.datasets.digits.load_digits_split`);
2. training: a small CNN (:class:`DigitsCNN`, about 3.7k parameters) trained for a few seconds with Adam;
3. kernels: for every kernel in :data:`KERNELS` the train x train block K and the test x train block K* via
   :func:`tangentlens.api.train_test_kernels` (trNTK⁰ is scaled by the standard deviation of its train x
   train block, as in the method);
4. surrogates: for every surrogate in :data:`SURROGATES` a :class:`tangentlens.surrogate.KernelSurrogate`
   fitted on K, scored on K* by its ``comparison_logits``: the exact L-BFGS solver on the true labels (the
   reference's target), the same solver on the network's soft probabilities (a distilled surrogate), and the
   reference SGD settings on trNTK;
5. faithfulness: Kendall-τ of the true-class probability, test accuracy differential, misclassification
   overlap Γ with its binomial p-value, linearization R², all in float64, from
   :func:`tangentlens.faithfulness.faithfulness`;
6. explanations: the most faithful surrogate (highest τ) explains the *network's* predicted class on every
   test digit (:func:`tangentlens.explain.explain` with ``target="network"``): top proponents and
   opponents, their coverage of the logit, and whether network and surrogate agree;
7. report: a folder with ``index.html`` (self-contained: a verdict in words, the tables with every column
   explained, the figures, the configuration), ``scatter.png`` (network vs surrogate true-class
   confidence, trNTK), ``gallery.png`` (test digits with the top proponents and opponents of the network's
   class) and ``results.json`` (the table, the full metrics, the verdict and the per-digit explanations).

Kernels and surrogates are *data* (:class:`KernelSpec`, :class:`SurrogateSpec` in
:mod:`tangentlens.demo.specs`): add a row to the tuples to add one to the demo. The report's words (column
legends, the verdict) are in :mod:`tangentlens.demo.words`.
"""

from .network import DigitsCNN, train_cnn
from .run import DemoConfig, DemoResult, run_demo
from .specs import KERNELS, SURROGATES, KernelSpec, SurrogateSpec
from .words import EXPLANATION_COLUMNS, FAITHFULNESS_COLUMNS, explanation_table, verdict_in_words

__all__ = [
    "EXPLANATION_COLUMNS",
    "FAITHFULNESS_COLUMNS",
    "KERNELS",
    "SURROGATES",
    "DemoConfig",
    "DemoResult",
    "DigitsCNN",
    "KernelSpec",
    "SurrogateSpec",
    "explanation_table",
    "run_demo",
    "train_cnn",
    "verdict_in_words",
]
