"""Pure tensor kernels of the task-vector merge methods, and the registry that names them."""

from hm3.methods.registry import METHODS, MergeMethod, get_method

__all__ = ["METHODS", "MergeMethod", "get_method"]
