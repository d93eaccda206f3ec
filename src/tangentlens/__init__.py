"""tangentlens: explain neural networks with empirical neural tangent kernel surrogates.

Functional core: :func:`kernel`, :func:`train_test_kernels`, :func:`compute` (:class:`KernelBlocks`),
:func:`features`, :func:`iter_features` (:class:`Featurizer`), all configured by keywords or a
:class:`KernelConfig` (and :class:`Projection` for the projected variants).
Surrogates: :class:`KernelSurrogate` and its
baselines. Faithfulness: :func:`faithfulness`, :func:`aggregate`. Explanations: :func:`explain`,
:func:`most_similar`. Counterfactual attribution: :func:`attribute`, :func:`top_attributions`,
:func:`kglm_contributions`; streamed from feature stores: :func:`attribute_from_store`,
:func:`top_attributions_from_store` (q from :func:`attribution_q` / :func:`attribution_q_from_model`).
On disk: :func:`featurize` (:class:`FeatureStore`), :func:`kernel_from_store` (:class:`KernelStore`),
:func:`save_surrogate` / :func:`load_surrogate` (:class:`SurrogateStore`).
"""

from .api import available_kinds, compute, features, iter_features, kernel, train_test_kernels
from .attribution import TopAttributions, attribute, kglm_contributions, top_attributions
from .attribution_core import attribution_q, attribution_q_from_model
from .blocks import KernelBlocks
from .config import KernelConfig
from .errors import (
    DeviceError,
    InputError,
    MemoryBudgetError,
    MemoryBudgetWarning,
    ModelCallError,
    ModelOutputError,
    NonFiniteError,
    ParameterSelectionError,
    StoreMismatchError,
    TangentLensError,
    UnknownKindError,
    UnsupportedLayerError,
    UnsupportedLayerWarning,
    WorkerLostError,
)
from .explain import explain, most_similar
from .faithfulness import FaithfulnessResult, aggregate, faithfulness, format_mean_se
from .features import Featurizer
from .lds import LDSResult, SubsetRetrainer, SubsetRuns, lds, margins, subset_masks
from .probes import output_probes
from .projection import FidelityReport, Projection, fidelity, fidelity_curve
from .store import (
    DataRecipe,
    FeatureStore,
    KernelStore,
    ModelRecipe,
    SurrogateStore,
    featurize,
    kernel_from_store,
    load_surrogate,
    save_surrogate,
)
from .store.attribute import attribute_from_store, top_attributions_from_store
from .surrogate import KernelRidgeSurrogate, KernelSurrogate, KernelSVMSurrogate, PrimalKernelSurrogate

__version__ = "0.1.0"

__all__ = [
    "kernel",
    "train_test_kernels",
    "features",
    "iter_features",
    "available_kinds",
    "compute",
    "KernelConfig",
    "KernelBlocks",
    "Featurizer",
    "Projection",
    "output_probes",
    "fidelity",
    "fidelity_curve",
    "FidelityReport",
    "KernelSurrogate",
    "KernelSVMSurrogate",
    "KernelRidgeSurrogate",
    "PrimalKernelSurrogate",
    "faithfulness",
    "FaithfulnessResult",
    "aggregate",
    "format_mean_se",
    "explain",
    "most_similar",
    "attribute",
    "top_attributions",
    "TopAttributions",
    "kglm_contributions",
    "attribute_from_store",
    "top_attributions_from_store",
    "attribution_q",
    "attribution_q_from_model",
    "TangentLensError",
    "InputError",
    "ModelOutputError",
    "UnknownKindError",
    "ParameterSelectionError",
    "NonFiniteError",
    "StoreMismatchError",
    "UnsupportedLayerWarning",
    "UnsupportedLayerError",
    "ModelCallError",
    "DeviceError",
    "MemoryBudgetError",
    "MemoryBudgetWarning",
    "WorkerLostError",
    "lds",
    "LDSResult",
    "SubsetRetrainer",
    "SubsetRuns",
    "subset_masks",
    "margins",
    "featurize",
    "FeatureStore",
    "kernel_from_store",
    "KernelStore",
    "ModelRecipe",
    "DataRecipe",
    "SurrogateStore",
    "save_surrogate",
    "load_surrogate",
    "__version__",
]
