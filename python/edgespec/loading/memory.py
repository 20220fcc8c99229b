"""How much context fits on the device.

The KV cache is allocated for the whole context up front. A model's own maximum often does not fit
beside its weights: Llama-3.1-8B allows 131072 positions, 16 GiB of bf16 K/V on top of 15 GiB of
weights, so a 24 GB card runs out of memory at load. On CUDA, when the caller does not choose the
context, it is the model's maximum or what fits in KV_SHARE of the memory left after the weights,
whichever is smaller; a context the caller asks for that cannot fit is refused before anything is
allocated for it, with the numbers. Draft models, CUDA graphs and the allocator's slack live in
the rest.
"""
from __future__ import annotations

import logging

import torch

from ..errors import DeviceMemoryError
from ..generation import DEFAULT_PREFILL_CHUNK
from ..models.decoder import Decoder

logger = logging.getLogger("edgespec")

KV_SHARE = 0.85
WORKSPACE_BYTES = 1 << 30  # activations of a prefill chunk, attention and GEMM workspaces
CONTEXT_GRANULE = 256      # a capped context is a multiple of this
GiB = float(1 << 30)


def kv_bytes_per_position(model: Decoder) -> int:
    """Bytes of KV cache per context position: K and V of every layer, plus InfLLM-v2's compressed
    keys (one per kernel_stride positions) for a sparse model."""
    c = model.config
    per = c.num_layers * 2 * c.num_kv_heads * c.head_dim * model.dtype.itemsize
    if model.sparse is not None:
        per += -(-c.num_layers * c.num_kv_heads * c.head_dim * model.dtype.itemsize // model.sparse.cfg.kernel_stride)
    return per


def reserved_bytes(model: Decoder) -> int:
    """Memory kept outside the KV budget: a workspace, plus a prefill chunk's fp32 logits three
    times over (scoring a prompt holds logits, log-probabilities and a temporary)."""
    return WORKSPACE_BYTES + 3 * DEFAULT_PREFILL_CHUNK * model.config.vocab_size * 4


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None elsewhere (host memory is not planned: it can swap)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def plan_context(model: Decoder, requested: int | None, free: int, name: str) -> int:
    """The context to allocate: `requested` if it fits in `free` bytes (else DeviceMemoryError), or
    the model's maximum capped to KV_SHARE of what the reserve leaves."""
    per = kv_bytes_per_position(model)
    usable = free - reserved_bytes(model)
    if requested is not None:
        if requested * per > usable:
            raise DeviceMemoryError(
                f"{name}: a context of {requested} positions needs {requested * per / GiB:.2f} GiB of KV cache, but "
                f"{free / GiB:.2f} GiB are free after the weights ({reserved_bytes(model) / GiB:.2f} GiB of them kept "
                f"for activations): at most {max(usable, 0) // per} positions fit")
        return requested
    fit = int(max(usable, 0) * KV_SHARE) // per // CONTEXT_GRANULE * CONTEXT_GRANULE
    if fit >= model.max_context:
        return model.max_context
    if fit < CONTEXT_GRANULE:
        raise DeviceMemoryError(
            f"{name}: {free / GiB:.2f} GiB are free after the weights, too little for a KV cache of "
            f"{CONTEXT_GRANULE} positions ({CONTEXT_GRANULE * per / GiB:.2f} GiB) beside {reserved_bytes(model) / GiB:.2f} "
            f"GiB of activations: use a smaller or 4-bit model, or free the GPU")
    logger.warning("%s: the context is capped at %d positions (the model allows %d) so that the KV cache fits in the "
                   "GPU's free memory; pass max_context (--max-context) to choose", name, fit, model.max_context)
    return fit
