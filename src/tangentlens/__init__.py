"""tangentlens: explain neural networks with empirical neural tangent kernel surrogates."""
__version__ = "0.1.0"
