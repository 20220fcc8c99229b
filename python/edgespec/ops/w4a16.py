"""W4A16 linear: 4-bit weights (per-group scales, optional zero points) x bf16/fp16/fp32 activations.

The dequantised weight of input row k, output column n, in group g = k // group_size, is

    w[k, n] = (q[k, n] - z[g, n]) * s[g, n]        (z = 8 when `zeros` is None: symmetric)

with q the 4-bit value (0..15). Every format edgespec reads maps onto this: GPTQ and AWQ store
integer zero points, GGUF Q4_0 is symmetric, Q4_1's `d * q + m` is z = -m / d and Q4_K's
`d * sc * q - dmin * mc` is group 32 with s = d * sc, z = dmin * mc / s.

Three paths:
* kernel: the fragment-ordered CUDA kernel (`csrc/kernels/w4a16.cuh`) for CUDA tensors in the tile
  layout and the shapes it supports (see `_kernels.supports_w4a16`);
* CPU int4: torch's CPU int4 GEMM on the 4-bit weights (`w4a16_cpu`), for bf16 activations and
  the shapes it takes: under a third of a dense bf16 weight's bytes per decode step;
* torch: dequantise, then one matmul, for everything else. The dequantised weight is cached on
  the W4A16Weight while a process-wide byte budget allows (EDGESPEC_W4A16_CACHE_MB; default a
  quarter of the device's memory; on a GPU also only while GPU_KEEP_FREE stays free), so once warm
  it runs as fast as a dense weight.
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import backend, w4a16_cpu
from .linear import linear

LAYOUTS = ("plain", "tile", "cpu")
# Weights per tile of W4A16Weight.dequantize on the CPU: 4 MB of fp32 intermediates, which stay
# in cache, in few enough tiles that the per-tile Python cost stays near 5% (2^18 and 2^21 measured
# no better, ad hoc).
DEQUANT_TILE = 2**20


@dataclass(eq=False)
class W4A16Weight:
    """The 4-bit weight of one linear with K inputs and N outputs.

    qweight:    int32, plain layout [ceil(K/8), N] or tile layout [K/16, 2N]; or uint8, torch's CPU
                int4 layout [N, K/2] (edgespec.quant.layout)
    scales:     [G, N] float (fp32/bf16/fp16, normally the compute dtype), G = ceil(K / group_size)
    zeros:      [G, N] float zero points in units of q, or None for symmetric weights (z = 8)
    group_size: rows of K per group (K itself for per-channel scales)
    perm:       int64 [K] or None. With act-order checkpoints the rows of qweight are stored
                sorted by group; row j belongs to input feature perm[j], i.e. the op multiplies
                x[..., perm] by the stored rows.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    in_features: int
    out_features: int
    layout: str = "plain"
    perm: torch.Tensor | None = None
    _dense: torch.Tensor | None = field(default=None, repr=False)      # torch path cache
    _cpu_int4: tuple | None = field(default=None, repr=False)          # CPU int4 path packing (w4a16_cpu)
    _refused: tuple | None = field(default=None, repr=False)           # DEQUANT_BUDGET's last refusal

    def __post_init__(self) -> None:
        k, n, g = self.in_features, self.out_features, self.group_size
        if k <= 0 or n <= 0:
            raise ValueError(f"W4A16Weight: in_features and out_features must be positive, got K={k}, N={n}")
        if g <= 0:
            raise ValueError(f"W4A16Weight: group_size must be positive (K={k} for per-channel), got {g}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"W4A16Weight: layout must be one of {LAYOUTS}, got {self.layout!r}")
        expected, dtype = {"plain": ((-(-k // 8), n), torch.int32), "tile": ((k // 16, 2 * n), torch.int32),
                           "cpu": ((n, k // 2), torch.uint8)}[self.layout]
        if self.qweight.dtype != dtype or tuple(self.qweight.shape) != expected:
            raise ValueError(f"W4A16Weight: {self.layout} qweight must be {str(dtype).removeprefix('torch.')} "
                             f"{list(expected)} for K={k}, N={n}, got {self.qweight.dtype} {list(self.qweight.shape)}")
        if self.layout == "tile" and (k % 16 or n % 64):
            raise ValueError(f"W4A16Weight: the tile layout needs K % 16 == 0 and N % 64 == 0, got K={k}, N={n}")
        if self.layout == "cpu" and (k % 2 or n % 64):
            raise ValueError(f"W4A16Weight: the cpu layout needs K % 2 == 0 and N % 64 == 0, got K={k}, N={n}")
        groups = -(-k // g)
        if not self.scales.is_floating_point() or tuple(self.scales.shape) != (groups, n):
            raise ValueError(f"W4A16Weight: scales must be float [{groups}, {n}] (group_size {g}), "
                             f"got {self.scales.dtype} {list(self.scales.shape)}")
        if self.zeros is not None and (tuple(self.zeros.shape) != (groups, n) or not self.zeros.is_floating_point()):
            raise ValueError(f"W4A16Weight: zeros must be float [{groups}, {n}] or None, "
                             f"got {self.zeros.dtype} {list(self.zeros.shape)}")
        if self.perm is not None and (self.perm.dtype != torch.int64 or tuple(self.perm.shape) != (k,)):
            raise ValueError(f"W4A16Weight: perm must be int64 [{k}] or None, got {self.perm.dtype} {list(self.perm.shape)}")

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    def unpacked(self) -> torch.Tensor:
        """The 4-bit values as uint8 [K, N], rows in stored (group-sorted) order."""
        from ..quant import layout  # noqa: PLC0415 - quant builds on ops; imported on use

        if self.layout == "plain":
            return layout.unpack_rows(self.qweight, self.in_features)
        if self.layout == "cpu":
            return layout.unpack_cpu(self.qweight, self.in_features, self.out_features)
        return layout.unpack_tile(self.qweight, self.in_features, self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W: [N, K] in `dtype`, columns in input-feature order (perm undone): (q - z) * s in fp32,
        rounded once to `dtype`.

        On the CPU it works through tiles of about DEQUANT_TILE weights, whole groups wide, whose
        fp32 intermediates stay in cache: the prefill dequantises every 4-bit weight for each chunk
        (w4a16_cpu), and a whole [N, K] fp32 copy took 2.1x-2.4x longer on Llama-1B/8B shapes (one
        core, ad hoc; about 1.5-2.2 ns a weight tiled) besides its transient 4 bytes per weight
        (470 MB for Llama-8B's gate|up). A GPU takes the weight as one tile."""
        from ..quant import layout  # noqa: PLC0415 - quant builds on ops; imported on use

        k, n, g, groups = self.in_features, self.out_features, self.group_size, self.num_groups
        out = torch.empty(n, k, dtype=dtype, device=self.device)
        scales = self.scales.float().t().contiguous()                           # [N, G]
        zeros = None if self.zeros is None else self.zeros.float().t().contiguous()
        if self.device.type == "cpu":
            cols = min(groups, max(1, DEQUANT_TILE // 64 // g)) * g            # whole groups
            rows = max(64, DEQUANT_TILE // cols // 64 * 64)                    # 64-row blocks (cpu layout)
        else:
            cols, rows = groups * g, n
        if self.layout == "cpu":
            def values(outputs: tuple[int, int], inputs: tuple[int, int]) -> torch.Tensor:
                return layout.unpack_cpu_transposed(self.qweight, k, n, outputs, inputs)
        elif self.layout == "plain":
            def values(outputs: tuple[int, int], inputs: tuple[int, int]) -> torch.Tensor:
                return layout.unpack_rows_transposed(self.qweight, k, outputs, inputs)
        else:  # the tile layout is the GPU's, which takes the weight as one tile
            q_kn = self.unpacked()

            def values(outputs: tuple[int, int], inputs: tuple[int, int]) -> torch.Tensor:
                return q_kn[slice(*inputs), slice(*outputs)].t().contiguous()
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            for k0 in range(0, k, cols):
                k1 = min(k, k0 + cols)
                q = values((n0, n1), (k0, k1))                                  # uint8 [n1 - n0, k1 - k0]
                tile_groups = -(-(k1 - k0) // g)
                if tile_groups * g != k1 - k0:  # the weight's last, partial group
                    q = torch.nn.functional.pad(q, (0, tile_groups * g - (k1 - k0)))
                w = q.view(n1 - n0, tile_groups, g).float()
                part = (slice(n0, n1), slice(k0 // g, k0 // g + tile_groups), None)
                w -= 8.0 if zeros is None else zeros[part]
                w *= scales[part]
                w = w.view(n1 - n0, tile_groups * g)[:, :k1 - k0]
                if self.perm is None:
                    out[n0:n1, k0:k1] = w
                else:  # stored row j multiplies input feature perm[j]: scatter the columns back
                    out[n0:n1].index_copy_(1, self.perm[k0:k1], w.to(dtype))
        return out

    def sub(self, inputs: tuple[int, int] | None = None,
            outputs: tuple[int, int] | None = None) -> "W4A16Weight | None":
        """The weight of input features [k0, k1) and output features [n0, n1), sharing this one's
        storage (no copy), or None where the packing does not allow the cut: act-order weights; the
        cpu layout;
        outputs not on 64-column tiles (tile layout); inputs not on 8-row words (plain) or 16-row
        tiles (tile), or cutting a group of scales. BlockFFN's torch path uses it to dequantise only
        a step's active experts when the whole weight is not cached."""
        k, n, g = self.in_features, self.out_features, self.group_size
        k0, k1 = inputs if inputs is not None else (0, k)
        n0, n1 = outputs if outputs is not None else (0, n)
        if not (0 <= k0 < k1 <= k and 0 <= n0 < n1 <= n) or self.perm is not None or self.layout == "cpu":
            return None
        row_unit, col_unit = (8, 1) if self.layout == "plain" else (16, 64)
        if k0 % row_unit or (k1 % row_unit and k1 != k) or n0 % col_unit or (n1 % col_unit and n1 != n):
            return None
        if (k0, k1) != (0, k) and (k0 % g or (k1 % g and k1 != k)):
            return None
        if self.layout == "plain":
            q = self.qweight[k0 // 8:-(-k1 // 8), n0:n1]
        else:
            tiles = self.qweight.view(k // 16, n // 64, 128)[k0 // 16:k1 // 16, n0 // 64:n1 // 64]
            q = tiles.reshape(tiles.shape[0], -1)
        groups = slice(k0 // g, -(-k1 // g))
        return W4A16Weight(qweight=q, scales=self.scales[groups, n0:n1],
                           zeros=None if self.zeros is None else self.zeros[groups, n0:n1],
                           group_size=g,
                           in_features=k1 - k0, out_features=n1 - n0, layout=self.layout)

    def nbytes(self) -> int:
        """Bytes of the quantized representation (what a decode step streams)."""
        ts = [self.qweight, self.scales, self.zeros, self.perm]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


# Bytes the dequantised-weight cache leaves free on a GPU: the activations' share that the loader
# keeps out of the KV cache's plan (loading/memory.py WORKSPACE_BYTES), which sizes the cache to
# most of the memory the weights leave.
GPU_KEEP_FREE = 1 << 30


def _free_bytes(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None on the CPU (host memory is not planned)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured: nothing is kept from inside a capture (its
    allocations belong to the graph's pool; the warm-up runs before it keep what fits)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _DequantBudget:
    """Process-wide bytes of dequantised weights kept, per device type.

    First come, first served rather than LRU: a decode step touches every layer once in the same
    order, so an LRU smaller than the model evicts each weight just before it is needed again and
    caches nothing useful; a fixed set of cached layers keeps its speed-up on every step.

    On a GPU a weight is also kept only while GPU_KEEP_FREE bytes stay free beside it: the KV
    cache was planned to take most of the memory after the weights, and a cache that grew into
    the activations' share (a long prefill on a small card) would end the run out of memory.
    """

    def __init__(self) -> None:
        self.used: dict[str, int] = {}
        self.releases = 0   # kept weights freed so far: a refusal holds until this or the limit moves
        self._lock = threading.Lock()

    def refusal_key(self, device: torch.device) -> tuple[int, int]:
        """What a refusal depended on: a weight refused under the same key is refused again, so
        it need not ask (on a GPU each ask is a device memory query)."""
        return self.releases, self.limit(device)

    @staticmethod
    def limit(device: torch.device) -> int:
        env = os.environ.get("EDGESPEC_W4A16_CACHE_MB")
        if env is not None:
            try:
                return int(float(env) * 2**20)
            except ValueError:
                raise ValueError(f"EDGESPEC_W4A16_CACHE_MB={env!r} is not a number of MiB") from None
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
        else:
            try:
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError, AttributeError):
                total = 8 * 2**30
        return total // 4

    def reserve(self, device: torch.device, nbytes: int) -> bool:
        with self._lock:
            used = self.used.get(device.type, 0)
            if used + nbytes > self.limit(device):
                return False
            free = _free_bytes(device)
            if free is not None and free - nbytes < GPU_KEEP_FREE:
                return False
            self.used[device.type] = used + nbytes
            return True

    def release(self, device_type: str, nbytes: int) -> None:
        with self._lock:
            self.used[device_type] = self.used.get(device_type, 0) - nbytes
            self.releases += 1


DEQUANT_BUDGET = _DequantBudget()

# The weights kept by the innermost keep_dequantized() block of each thread.
_PREFILL = threading.local()


@contextlib.contextmanager
def keep_dequantized() -> Iterator[None]:
    """Within the block, a 4-bit weight that a prefill chunk dequantises for the CPU's dense GEMM
    (prefill_dense) is kept for the later chunks, within DEQUANT_BUDGET, and freed when the block
    ends. generation.prefill opens one for a prompt of several chunks: without it each chunk
    dequantises every weight again (ad hoc, the demo's 1966-token prompt in 4 chunks, one core: 2.47 s
    against 1.65 s with every weight kept, about the dense model's 1.70 s)."""
    outer = getattr(_PREFILL, "kept", None)
    kept: dict[int, tuple["W4A16Weight", torch.Tensor]] = {}
    _PREFILL.kept = kept
    try:
        yield
    finally:
        _PREFILL.kept = outer
        for w, dense in kept.values():
            DEQUANT_BUDGET.release(w.device.type, dense.numel() * dense.element_size())


def prefill_dense(w: "W4A16Weight", dtype: torch.dtype) -> torch.Tensor:
    """[N, K] dequantised weight for one prefill chunk: inside keep_dequantized(), the one an
    earlier chunk made (or made now and kept while the budget allows); outside it, made for this
    call alone."""
    kept = getattr(_PREFILL, "kept", None)
    entry = kept.get(id(w)) if kept is not None else None
    if entry is not None and entry[1].dtype == dtype:
        return entry[1]
    dense = w.dequantize(dtype)
    if kept is not None and entry is None and DEQUANT_BUDGET.reserve(w.device, dense.numel() * dense.element_size()):
        kept[id(w)] = (w, dense)  # w itself too: its id stays unique while the block holds it
    return dense


def cached_dense(w: W4A16Weight, dtype: torch.dtype) -> torch.Tensor | None:
    """[N, K] dequantised weight in `dtype` kept on `w`: made now when the budget allows, else None
    (nothing is dequantised then)."""
    cached = w._dense
    if cached is not None:
        return cached if cached.dtype == dtype else None
    key = DEQUANT_BUDGET.refusal_key(w.device)
    if _capturing(w.device) or w._refused == key:
        return None
    nbytes = w.in_features * w.out_features * torch.empty(0, dtype=dtype).element_size()
    if not DEQUANT_BUDGET.reserve(w.device, nbytes):
        w._refused = key
        return None
    w._dense = w.dequantize(dtype)
    weakref.finalize(w, DEQUANT_BUDGET.release, w.device.type, nbytes)
    return w._dense


def dense_weight(w: W4A16Weight, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] dequantised weight in `dtype`, cached on `w` when the budget allows."""
    dense = cached_dense(w, dtype)
    return dense if dense is not None else w.dequantize(dtype)


def kernel_available() -> bool:
    """Whether the compiled extension carries the W4A16 kernel (never touches the GPU)."""
    module = backend.compiled_module()
    return module is not None and hasattr(module, "w4a16_gemm") and backend.requested_backend() != "torch"


def w4a16_linear(x: torch.Tensor, w: W4A16Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias with W the dequantised 4-bit weight.

    x:    [..., K] fp32/bf16/fp16 on w's device
    w:    W4A16Weight with K = in_features, N = out_features
    bias: [N] or None, any float dtype (cast to x's)
    Returns [..., N] in x's dtype.
    """
    if x.shape[-1] != w.in_features:
        raise ValueError(f"w4a16_linear: x has {x.shape[-1]} input features but the weight expects {w.in_features}")
    if not x.is_floating_point():
        raise TypeError(f"w4a16_linear: x must be a float tensor, got {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"w4a16_linear: x is on {x.device} but the weight is on {w.device}")
    if bias is not None and tuple(bias.shape) != (w.out_features,):
        raise ValueError(f"w4a16_linear: bias shape {tuple(bias.shape)} != ({w.out_features},)")
    if backend.use_kernel(x, w.qweight, w.scales):
        from . import _kernels  # noqa: PLC0415 - only with the compiled extension

        if _kernels.supports_w4a16(x, w, bias):
            return _kernels.w4a16_linear(x, w, bias)
    if x.device.type == "cpu" and w4a16_cpu.rejection(x, w) is None:
        return w4a16_cpu.linear(x, w, bias)
    # ops.linear: row-invariant on the CPU, like a dense projection (speculative == plain, bitwise).
    return linear(x, dense_weight(w, x.dtype), None if bias is None else bias.to(x.dtype))
