"""The op layer: the only caller of the compiled extension.

Each op has a torch path (CPU or CUDA tensors) and, where one exists, a CUDA kernel path chosen
automatically for CUDA tensors of supported shapes. `EDGESPEC_BACKEND=torch` forces the torch path.
"""
from .activation import silu_and_mul
from .attention import attention, pack_tree_mask, tree_mask_words, unpack_tree_mask
from .backend import compiled_module, requested_backend, use_kernel
from .embedding import embedding
from .linear import ConcatLinear, DenseLinear, fuse_linears, linear
from .moe import blockffn, blockffn_experts, blockffn_router
from .norm import rms_norm
from .rope import RopeTable, apply_rope, build_rope_table
from .sampling import (MAX_TOP_LOGPROBS, apply_penalties, argmax, logit_bias_vector, logits_to_probs, sample,
                       token_logprobs, validate_logit_bias, validate_penalties, validate_sampling)
from .sparse_attention import block_scores, compress_keys, select_blocks, sparse_attention
from .w4a16 import W4A16Weight, w4a16_linear

__all__ = [
    "ConcatLinear", "DenseLinear", "MAX_TOP_LOGPROBS", "RopeTable", "fuse_linears", "apply_penalties", "apply_rope", "argmax", "attention", "block_scores", "blockffn",
    "blockffn_experts", "blockffn_router", "build_rope_table",
    "compiled_module", "compress_keys", "embedding", "linear", "logit_bias_vector", "logits_to_probs", "pack_tree_mask", "requested_backend",
    "rms_norm", "sample", "select_blocks", "silu_and_mul", "sparse_attention", "token_logprobs", "tree_mask_words", "unpack_tree_mask", "use_kernel",
    "validate_logit_bias", "validate_penalties", "validate_sampling", "W4A16Weight", "w4a16_linear",
]
