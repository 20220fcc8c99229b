"""Exceptions raised by edgespec. Every message names what was wrong and what was expected."""


class EdgespecError(Exception):
    """Base class for errors raised by edgespec."""


class ModelFormatError(EdgespecError, ValueError):
    """A checkpoint, config or tokenizer file is malformed or unsupported."""


class ContextLengthError(EdgespecError, ValueError):
    """A prompt (plus requested tokens) does not fit in the model's context."""


class NumericalError(EdgespecError, RuntimeError):
    """The model produced NaN or +inf logits (an fp16 overflow, or NaN/inf in the weights)."""


class KernelError(EdgespecError, RuntimeError):
    """A CUDA kernel rejected its inputs or failed on the device."""


class GenerationCancelled(EdgespecError):
    """A generation's cancel callback asked it to stop (raised between prefill chunks; LLM.stream
    turns it into finish_reason "cancelled")."""


class DemoModelError(EdgespecError, RuntimeError):
    """The demo model could not be fetched or verified."""


class DeviceMemoryError(EdgespecError, RuntimeError):
    """A model's weights or its KV cache do not fit in the device's free memory."""
