"""shira_kernels: fast, exact kernels for sparse (SHiRA) and 1-bit adapters in PyTorch."""
from . import backends
from .backends import use_backend
from .ops import scatter_swap_, validate_indices

__version__ = "0.1.0"
__all__ = ["backends", "scatter_swap_", "use_backend", "validate_indices", "__version__"]
