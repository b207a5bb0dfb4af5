"""prunus: make neural networks sparse, measure it honestly, and make the sparsity pay."""

__version__ = "0.1.0"
