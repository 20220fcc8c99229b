"""edgespec: fast single-GPU LLM inference with speculative decoding.

Importing edgespec never touches a GPU and works without CUDA libraries.
"""
__version__ = "0.1.0"

from ._build import build_info  # noqa: E402

__all__ = ["__version__", "build_info"]
