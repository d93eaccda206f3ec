"""Stores on disk (Zarr v3): feature rows of a model on a data set, and kernels computed from them out of
core — persistent, resumable, checked against the configuration, model and data on reopen.

:func:`featurize` streams a :class:`~tangentlens.Featurizer`'s rows into a :class:`FeatureStore`;
:func:`kernel_from_store` multiplies stored features block by block into a :class:`KernelStore`;
:func:`save_surrogate` keeps a fitted surrogate's coefficients (:class:`SurrogateStore`). Manifests
are JSON; nothing is unpickled. Both run on a ``dask.distributed`` cluster with ``scheduler=``
(:mod:`tangentlens.store.distributed`); a :class:`ModelRecipe` tells the workers how to rebuild the model.
"""

from .features import FeatureStore
from .featurize import featurize
from .fingerprint import data_fingerprint, model_fingerprint
from .kernels import KernelStore, kernel_from_store
from .recipe import DataRecipe, ModelRecipe
from .surrogates import SurrogateStore, load_surrogate, save_surrogate

__all__ = [
    "featurize", "FeatureStore", "kernel_from_store", "KernelStore", "model_fingerprint", "data_fingerprint",
    "ModelRecipe", "DataRecipe", "SurrogateStore", "save_surrogate", "load_surrogate",
]
