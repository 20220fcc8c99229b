"""Chooses between the torch path and the compiled CUDA kernels for each op call.

The kernel path is taken only when all of these hold: the extension `edgespec._C` was built
with CUDA, `EDGESPEC_BACKEND` is not `torch`, every tensor argument lives on a CUDA device, and
the op's own `supports(...)` check accepts the shapes and dtypes. Nothing here touches the GPU
at import time.
"""
from __future__ import annotations

import os
from functools import lru_cache
from types import ModuleType

import torch

_VALID = ("auto", "torch", "cuda")


def requested_backend() -> str:
    """The backend asked for through EDGESPEC_BACKEND: 'auto' (default), 'torch' or 'cuda'."""
    value = os.environ.get("EDGESPEC_BACKEND", "auto").strip().lower() or "auto"
    if value not in _VALID:
        raise ValueError(f"EDGESPEC_BACKEND={value!r} is not one of {', '.join(_VALID)}")
    return value


@lru_cache(maxsize=1)
def compiled_module() -> ModuleType | None:
    """The compiled extension, or None when the package was installed without CUDA."""
    try:
        from edgespec import _C  # noqa: PLC0415 - optional compiled extension
    except ImportError:
        return None
    return _C if getattr(_C, "HAS_CUDA", False) else None


def use_kernel(*tensors: torch.Tensor | None) -> bool:
    """True when the CUDA kernel path should run for an op over these tensors."""
    mode = requested_backend()
    if mode == "torch":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if not on_cuda:
        return False
    if compiled_module() is None:
        if mode == "cuda":
            raise RuntimeError(
                "EDGESPEC_BACKEND=cuda but edgespec was installed without its CUDA extension "
                "(build with nvcc available, see README 'Building for GPUs')"
            )
        return False
    return True


def row_invariant_kernels() -> bool:
    """Whether the GPU runs the row-invariant kernels (EDGESPEC_ROW_INVARIANT, default 1): the
    dense projections of few rows on csrc/kernels/dense_gemm.h instead of cuBLAS, and decode and
    tree attention in the kernels' row-invariant mode. With them a token decoded alone and the
    same token verified in a draft tree get bitwise the same logits, so greedy speculative output
    equals plain greedy output token for token. 0 trades that for cuBLAS and the heuristic
    attention splits (bench_e2e.py measures the difference on a GPU)."""
    value = os.environ.get("EDGESPEC_ROW_INVARIANT", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"EDGESPEC_ROW_INVARIANT must be 0 or 1, got {value!r}")
    return value == "1"
