"""Bit layouts of 4-bit weights: the plain layout the torch path reads, the fragment-ordered
("tile") layout the W4A16 CUDA kernel reads, and torch's CPU int4 kernel's layout ("cpu").

Throughout, `q` is the unpacked weight of a linear y = x @ W.T with W: [N, K], stored transposed
as uint8 [K, N] (row k = input feature, column n = output feature, values 0..15) because every
checkpoint format and the kernel walk K in the outer loop.

Plain layout (`"plain"`), int32 [ceil(K/8), N]: nibble i (bits 4i..4i+3) of element [r, n] holds
q[8r + i, n]; rows past K are zero. This is exactly GPTQ's `qweight`, so GPTQ checkpoints without
act-order load without any repacking.

Tile layout (`"tile"`), int32 [K/16, 2N] (needs K % 16 == 0 and N % 64 == 0), viewed as
[K/16, N/64, 32, 4]: one 16 x 64 block of q (k16 tile kt, n64 tile nt) is 128 int32 = one 16-byte
vector per lane of a warp, so a warp fetches a whole block with one coalesced 512-byte load and
every value lands in the register that feeds `mma.sync.m16n8k16` without any shuffle:

    lane l (0..31), word j (0..3) covers the two n8 sub-tiles
        na = nt*64 + 16 j + l//4      nb = na + 8
    and the four k rows of l's B fragment
        r0 = kt*16 + 2 (l % 4):      r0, r0 + 1, r0 + 8, r0 + 9
    in the fragment order
        e = [q[r0,na], q[r0+1,na], q[r0+8,na], q[r0+9,na], q[r0,nb], q[r0+1,nb], q[r0+8,nb], q[r0+9,nb]]
    and nibble i of the word holds e[NIBBLE_ORDER[i]], NIBBLE_ORDER = [0, 2, 4, 6, 1, 3, 5, 7].

Why the interleave: the kernel turns a word into half2/bf162 pairs by masking it with 0x000F000F
(after shifting by 0, 4, 8, 12 bits), which extracts nibbles (0, 4), (1, 5), (2, 6), (3, 7) as
the low/high halves of one register. With the order above those pairs are (e0, e1), (e2, e3),
(e4, e5), (e6, e7): exactly the two B registers of sub-tile na and then of sub-tile nb
({B[2t][g], B[2t+1][g]} and {B[2t+8][g], B[2t+9][g]} in PTX's m16n8k16 fragment notation).

Concatenating two tile-layout weights along N is a concatenation along dim 1, which is what makes
fused q|k|v and gate|up projections free in this layout.

CPU layout (`"cpu"`), uint8 [N, K/2] (needs N % 64 == 0 and K even), viewed as [N/64, K, 32]: byte
j of row k in block b holds q[k, 64b + j] in its low nibble and q[k, 64b + 32 + j] in its high
one. It is torch's own packing for its CPU int4 kernel (`aten._convert_weight_to_int4pack_for_cpu`,
which makes it; edgespec/ops/w4a16_cpu.py), not a format edgespec chose: pack_cpu unpacks every
weight it packs and refuses (None) if torch ever packs differently, so a weight is never stored in
a layout edgespec cannot read back.
"""
from __future__ import annotations

import sys
from functools import lru_cache

import torch

NIBBLE_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Packing views byte pairs as int32 words (pack_nibbles): the bit layout assumes little-endian
# words, as on x86, ARM and every CUDA GPU.
assert sys.byteorder == "little", "edgespec's 4-bit packing assumes a little-endian host"
# Tile geometry: rows (K) and columns (N) of one fragment-ordered block.
TILE_K = 16
TILE_N = 64


def _check_q(q: torch.Tensor, what: str) -> None:
    if q.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D [K, N] tensor of 4-bit values, got shape {tuple(q.shape)}")
    if q.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise ValueError(f"{what}: expected an integer tensor of 4-bit values, got {q.dtype}")


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """values: integer [..., 8] in 0..15 -> int32 [...] with values[..., i] in bits 4i..4i+3.

    Byte j of a little-endian word holds nibbles 2j (low) and 2j + 1 (high), so the words are the
    byte pairs viewed as int32: two passes over uint8 data instead of eight over int32 (this runs
    for every weight of a model at load time).
    """
    v = values.to(torch.uint8)
    pairs = (v[..., 0::2] | (v[..., 1::2] << 4)).reshape(-1, 4)  # 4 bytes per word, rows contiguous
    return pairs.view(torch.int32).reshape(values.shape[:-1])


def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> uint8 [..., 8] with element i = bits 4i..4i+3 (inverse of pack_nibbles)."""
    b = words.to(torch.int32).reshape(-1).view(torch.uint8).reshape(-1, 4)  # [words, 4] bytes
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*words.shape, 8)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """q: uint8 [K, N] (0..15) -> plain layout int32 [ceil(K/8), N], packed along K (GPTQ qweight)."""
    _check_q(q, "pack_rows")
    k, n = q.shape
    pad = (-k) % 8
    if pad:
        q = torch.cat([q, q.new_zeros(pad, n)])
    return pack_nibbles(q.reshape(-1, 8, n).transpose(1, 2))


def unpack_rows(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Plain layout int32 [ceil(K/8), N] -> uint8 [K, N] (inverse of pack_rows)."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_rows: expected int32 [K/8, N], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[0] != -(-k // 8):
        raise ValueError(f"unpack_rows: {packed.shape[0]} packed rows cannot hold K={k} (expected {-(-k // 8)})")
    n = packed.shape[1]
    return unpack_nibbles(packed).transpose(1, 2).reshape(-1, n)[:k]


def unpack_rows_transposed(packed: torch.Tensor, k: int, outputs: tuple[int, int] | None = None,
                           inputs: tuple[int, int] | None = None) -> torch.Tensor:
    """Plain layout int32 [ceil(K/8), N] -> q[k0:k1, n0:n1] transposed, uint8 [n1 - n0, k1 - k0]
    (contiguous): the [N, K] order of a dequantised weight, for the output features outputs =
    (n0, n1) and input features inputs = (k0, k1) (default all)."""
    if packed.dim() != 2 or packed.dtype != torch.int32 or packed.shape[0] != -(-k // 8):
        raise ValueError(f"unpack_rows_transposed: expected int32 [{-(-k // 8)}, N] for K={k}, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    n = packed.shape[1]
    n0, n1 = outputs if outputs is not None else (0, n)
    k0, k1 = inputs if inputs is not None else (0, k)
    if not (0 <= n0 < n1 <= n and 0 <= k0 < k1 <= k):
        raise ValueError(f"unpack_rows_transposed: outputs {n0}..{n1} must lie within N={n} and inputs {k0}..{k1} "
                         f"within K={k}")
    w0, w1 = k0 // 8, -(-k1 // 8)                                  # the words holding rows k0..k1
    words = packed[w0:w1, n0:n1].t().contiguous()                  # [n1 - n0, w1 - w0]
    q = unpack_nibbles(words).reshape(n1 - n0, (w1 - w0) * 8)
    return q[:, k0 - 8 * w0:k1 - 8 * w0].contiguous()


def pack_cols(q: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """q: uint8 [R, N] -> int32 [R, ceil(N/8)] packed along N (GPTQ qzeros, AWQ qweight/qzeros).

    order: nibble i holds column 8c + order[i] (AWQ uses NIBBLE_ORDER); None = identity.
    """
    _check_q(q, "pack_cols")
    r, n = q.shape
    pad = (-n) % 8
    if pad:
        q = torch.cat([q, q.new_zeros(r, pad)], dim=1)
    groups = q.reshape(r, -1, 8)
    if order is not None:
        groups = groups[..., list(order)]
    return pack_nibbles(groups)


def unpack_cols(packed: torch.Tensor, n: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, ceil(N/8)] packed along N -> uint8 [R, N] (inverse of pack_cols)."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_cols: expected int32 [R, N/8], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != -(-n // 8):
        raise ValueError(f"unpack_cols: {packed.shape[1]} packed columns cannot hold N={n} (expected {-(-n // 8)})")
    nib = unpack_nibbles(packed)  # [R, N/8, 8], nibble i
    if order is not None:
        inverse = [0] * 8
        for i, c in enumerate(order):
            inverse[c] = i
        nib = nib[..., inverse]
    return nib.reshape(packed.shape[0], -1)[:, :n]


CPU_BLOCK_N = 64


def cpu_layout_ok(k: int, n: int) -> bool:
    """Whether a [K, N] weight can be stored in the CPU layout."""
    return k > 0 and n > 0 and k % 2 == 0 and n % CPU_BLOCK_N == 0


def pack_cpu(q: torch.Tensor) -> torch.Tensor | None:
    """q: [K, N] (0..15) -> CPU layout uint8 [N, K/2], made by torch; None when this torch lacks the
    op or its packing is not the layout above (checked by unpacking it)."""
    _check_q(q, "pack_cpu")
    k, n = q.shape
    if not cpu_layout_ok(k, n) or not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous().to(torch.int32), 2)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2) \
            or not torch.equal(unpack_cpu(packed, k, n), q.to(torch.uint8)):
        return None
    return packed


def unpack_cpu(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """CPU layout uint8 [N, K/2] -> uint8 [K, N] (inverse of pack_cpu)."""
    blocks = _cpu_byte_blocks(packed, k, n, "unpack_cpu")
    q = torch.cat([blocks & 0xF, blocks >> 4], dim=2)            # [N/64, K, 64]: columns j, then j + 32
    return q.permute(1, 0, 2).reshape(k, n)


def unpack_cpu_transposed(packed: torch.Tensor, k: int, n: int, outputs: tuple[int, int] | None = None,
                          inputs: tuple[int, int] | None = None) -> torch.Tensor:
    """CPU layout uint8 [N, K/2] -> q[k0:k1, n0:n1] transposed, uint8 [n1 - n0, k1 - k0]: the [N, K]
    order of a dequantised weight, made without a [K, N] copy in between, for the output features
    outputs = (n0, n1) (multiples of 64; default all) and the input features inputs = (k0, k1)."""
    n0, n1 = outputs if outputs is not None else (0, n)
    k0, k1 = inputs if inputs is not None else (0, k)
    if not (0 <= n0 < n1 <= n and n0 % CPU_BLOCK_N == 0 and n1 % CPU_BLOCK_N == 0 and 0 <= k0 < k1 <= k):
        raise ValueError(f"unpack_cpu_transposed: outputs {n0}..{n1} must be multiples of {CPU_BLOCK_N} within N={n} "
                         f"and inputs {k0}..{k1} within K={k}")
    blocks = _cpu_byte_blocks(packed, k, n, "unpack_cpu_transposed")[n0 // CPU_BLOCK_N:n1 // CPU_BLOCK_N, k0:k1]
    # Transpose the bytes (half the values), then split: low nibbles are a block's columns 0-31,
    # high ones 32-63. Contiguous, which the dequantising arithmetic after it needs to be fast.
    columns = blocks.transpose(1, 2).contiguous()                  # [blocks, 32, K]
    return torch.cat([columns & 0xF, columns >> 4], dim=1).reshape(n1 - n0, k1 - k0)


def _cpu_byte_blocks(packed: torch.Tensor, k: int, n: int, what: str) -> torch.Tensor:
    """The CPU layout's bytes as [N/64, K, 32] (block, row k, byte j)."""
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2) or not cpu_layout_ok(k, n):
        raise ValueError(f"{what}: expected uint8 [{n}, {k // 2}] with N % {CPU_BLOCK_N} == 0 and K even, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    return packed.reshape(n // CPU_BLOCK_N, k, CPU_BLOCK_N // 2)


def tile_layout_ok(k: int, n: int) -> bool:
    """Whether a [K, N] weight can be stored in the tile layout."""
    return k > 0 and n > 0 and k % TILE_K == 0 and n % TILE_N == 0


@lru_cache(maxsize=None)
def _tile_index() -> torch.Tensor:
    """int64 [32, 4, 8]: flat offset (row * 64 + col) inside a 16 x 64 block of the value that
    lane l, word j, nibble i holds."""
    idx = torch.empty(32, 4, 8, dtype=torch.int64)
    for lane in range(32):
        r0, col = 2 * (lane % 4), lane // 4
        for j in range(4):
            na = 16 * j + col
            nb = na + 8
            e = [(r0, na), (r0 + 1, na), (r0 + 8, na), (r0 + 9, na),
                 (r0, nb), (r0 + 1, nb), (r0 + 8, nb), (r0 + 9, nb)]
            for i in range(8):
                r, c = e[NIBBLE_ORDER[i]]
                idx[lane, j, i] = r * TILE_N + c
    return idx


def _blocks(k: int, n: int, what: str) -> tuple[int, int]:
    if not tile_layout_ok(k, n):
        raise ValueError(f"{what}: the tile layout needs K % {TILE_K} == 0 and N % {TILE_N} == 0, got K={k}, N={n}")
    return k // TILE_K, n // TILE_N


def pack_tile(q: torch.Tensor) -> torch.Tensor:
    """q: uint8 [K, N] (0..15) -> tile layout int32 [K/16, 2N] (see the module docstring)."""
    _check_q(q, "pack_tile")
    kt, nt = _blocks(q.shape[0], q.shape[1], "pack_tile")
    blocks = q.reshape(kt, TILE_K, nt, TILE_N).permute(0, 2, 1, 3).reshape(kt, nt, TILE_K * TILE_N)
    idx = _tile_index().to(q.device)
    vals = blocks[:, :, idx.reshape(-1)].reshape(kt, nt, 32, 4, 8)
    return pack_nibbles(vals).reshape(kt, 2 * q.shape[1])


def unpack_tile(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Tile layout int32 [K/16, 2N] -> uint8 [K, N] (inverse of pack_tile)."""
    kt, nt = _blocks(k, n, "unpack_tile")
    if packed.dtype != torch.int32 or tuple(packed.shape) != (kt, 2 * n):
        raise ValueError(f"unpack_tile: expected int32 [{kt}, {2 * n}] for K={k}, N={n}, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    vals = unpack_nibbles(packed.reshape(kt, nt, 32, 4)).reshape(kt, nt, -1)
    idx = _tile_index().to(packed.device).reshape(-1)
    blocks = torch.empty(kt, nt, TILE_K * TILE_N, dtype=torch.uint8, device=packed.device)
    blocks[:, :, idx] = vals
    return blocks.reshape(kt, nt, TILE_K, TILE_N).permute(0, 2, 1, 3).reshape(k, n)


def fragment_values(packed: torch.Tensor, kt: int, nt: int, lane: int, j: int) -> list[tuple[int, int, int]]:
    """What one lane of the kernel reads from one word, spelled out as the kernel decodes it:
    [(k, n, value)] for the registers (b0 lo, b0 hi, b1 lo, b1 hi) of sub-tile na, then of nb.

    A reference for tests and for anyone changing the kernel: it mirrors the shift/mask sequence
    of `dequant_word` in csrc/kernels/w4a16.cuh rather than the packing code above.
    """
    word = int(packed.reshape(packed.shape[0], -1, 32, 4)[kt, nt, lane, j]) & 0xFFFFFFFF
    r0 = kt * TILE_K + 2 * (lane % 4)
    na = nt * TILE_N + 16 * j + lane // 4
    out = []
    # Shift s = 0, 4, 8, 12 then mask 0x000F000F: low half = nibble s/4, high half = nibble s/4 + 4.
    coords = [((r0, na), (r0 + 1, na)), ((r0 + 8, na), (r0 + 9, na)),
              ((r0, na + 8), (r0 + 1, na + 8)), ((r0 + 8, na + 8), (r0 + 9, na + 8))]
    for step, (lo, hi) in enumerate(coords):
        pair = (word >> (4 * step)) & 0x000F000F
        out.append((lo[0], lo[1], pair & 0xF))
        out.append((hi[0], hi[1], pair >> 16))
    return out
