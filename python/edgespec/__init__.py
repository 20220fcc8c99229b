"""edgespec: fast single-GPU LLM inference with speculative decoding.

Importing edgespec never touches a GPU and works without CUDA libraries.
"""
__version__ = "0.1.0"

from ._build import build_info  # noqa: E402
from .engine import LLM, GenerationResult, GenerationStats, StreamEvent  # noqa: E402
from .errors import (ContextLengthError, DeviceMemoryError, EdgespecError, GenerationCancelled,  # noqa: E402
                     KernelError, ModelFormatError, NumericalError)
from .generation import GenerationConfig  # noqa: E402
from .loading import load_model  # noqa: E402

__all__ = ["LLM", "ContextLengthError", "DeviceMemoryError", "EdgespecError", "NumericalError", "GenerationCancelled", "GenerationConfig",
           "GenerationResult", "GenerationStats", "KernelError", "ModelFormatError", "StreamEvent", "__version__", "build_info",
           "load_model"]
