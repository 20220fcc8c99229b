"""Naive references for every op and for a whole decoder forward; this package never imports edgespec.

Written for clarity, not speed: explicit loops over heads, tokens and bits, masks as dense boolean
matrices, no fused tricks. It is the independent side of every correctness test:
tests/test_ops_cpu.py checks the op layer against it, GPU tests check the kernels against it, and
tests/test_parity_hf.py checks it against Hugging Face `transformers` on the same checkpoints.

Modules: attention (causal / tree / block-sparse masks, grouped-query attention), ops (RMSNorm,
gated SiLU MLP, linear, embedding, int4 dequantisation, argmax, sampling distribution), rope
(inverse frequencies of every scaling scheme, rotate-half application), decoder (a whole
Llama/Qwen2/Qwen3/MiniCPM forward from a config dict and a Hugging Face state dict), blockffn_ref.
Import from the modules (`from oracle.ops import rms_norm`).
"""
