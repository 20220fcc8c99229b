"""4-bit formats and bit layouts: pack/unpack round trips, readers against independent references
(loop-based packers written from the format specs here, and the `gguf` package's own quantizer
and dequantiser), and clear errors for bad or corrupt inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgespec.errors import ModelFormatError
from edgespec.quant import layout
from edgespec.quant.formats import Int4Weight, read_awq, read_gguf_q4, read_gptq, write_gguf_q4, write_gptq
from gguf_q4k import pack_q4k, quantize_q4k

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _ints(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)


def _as_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def ref_pack_gptq(q: np.ndarray, zeros: np.ndarray, v1: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec: qweight[r, n] nibble i = q[8r + i, n]; qzeros[g, c] nibble i = zero[g, 8c + i] (- 1 for v1)."""
    k, n = q.shape
    qweight = np.zeros((k // 8, n), dtype=np.uint64)
    for r in range(k // 8):
        for i in range(8):
            qweight[r] |= q[8 * r + i].astype(np.uint64) << np.uint64(4 * i)
    z = zeros.astype(np.int64) - (1 if v1 else 0)
    qzeros = np.zeros((zeros.shape[0], n // 8), dtype=np.uint64)
    for c in range(n // 8):
        for i in range(8):
            qzeros[:, c] |= z[:, 8 * c + i].astype(np.uint64) << np.uint64(4 * i)
    return _as_int32(qweight), _as_int32(qzeros)


def ref_pack_awq(q: np.ndarray) -> torch.Tensor:
    """Spec: packed[r, c] nibble i = q[r, 8c + AWQ_ORDER[i]]."""
    r_, n = q.shape
    out = np.zeros((r_, n // 8), dtype=np.uint64)
    for c in range(n // 8):
        for i in range(8):
            out[:, c] |= q[:, 8 * c + AWQ_ORDER[i]].astype(np.uint64) << np.uint64(4 * i)
    return _as_int32(out)


def oracle_dequant(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """[N, K] fp32: w[k, n] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]."""
    return ((q.float() - zeros.float()[g_idx]) * scales.float()[g_idx]).t()


# ---------------------------------------------------------------- bit layouts

@pytest.mark.parametrize("k,n", [(8, 1), (16, 64), (40, 24), (19, 7), (576, 192)])
def test_plain_layout_round_trip(k: int, n: int) -> None:
    q = _ints(k, n, seed=k * n)
    packed = layout.pack_rows(q)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (-(-k // 8), n)
    assert torch.equal(layout.unpack_rows(packed, k), q)
    assert torch.equal(layout.unpack_rows_transposed(packed, k), q.t())
    k0, k1, n0 = k // 3, k - k // 5, n // 2                       # ranges starting and ending inside words
    assert torch.equal(layout.unpack_rows_transposed(packed, k, (n0, n), (k0, k1)), q[k0:k1, n0:].t())


@pytest.mark.parametrize("order", [None, tuple(AWQ_ORDER)])
def test_column_packing_round_trip(order) -> None:
    q = _ints(5, 37, seed=3)
    assert torch.equal(layout.unpack_cols(layout.pack_cols(q, order), 37, order), q)


@pytest.mark.parametrize("k,n", [(16, 64), (48, 192), (576, 960), (2048, 128)])
def test_tile_layout_round_trip(k: int, n: int) -> None:
    q = _ints(k, n, seed=k + n)
    packed = layout.pack_tile(q)
    assert tuple(packed.shape) == (k // 16, 2 * n)
    assert torch.equal(layout.unpack_tile(packed, k, n), q)


def test_tile_layout_is_what_the_kernel_reads() -> None:
    """Every (k, n) of a weight is read exactly once, with its value, by the lane/word/register the
    mma.m16n8k16 B fragment puts it in (decoded the way the kernel decodes a word)."""
    k, n = 32, 128
    q = _ints(k, n, seed=11)
    packed = layout.pack_tile(q)
    seen = torch.zeros(k, n, dtype=torch.int64)
    for kt in range(k // 16):
        for nt in range(n // 64):
            for lane in range(32):
                group, tid = lane // 4, lane % 4
                for j in range(4):
                    vals = layout.fragment_values(packed, kt, nt, lane, j)
                    # PTX B fragment: b0 = rows 2t, 2t+1 and b1 = rows 2t+8, 2t+9 of column `group`.
                    expected_rows = [2 * tid, 2 * tid + 1, 2 * tid + 8, 2 * tid + 9] * 2
                    for e, (kk, nn, v) in enumerate(vals):
                        assert kk == kt * 16 + expected_rows[e]
                        assert nn == nt * 64 + 16 * j + group + (8 if e >= 4 else 0)
                        assert v == int(q[kk, nn])
                        seen[kk, nn] += 1
    assert bool((seen == 1).all())


def test_tile_layout_concatenates_along_n() -> None:
    a, b = _ints(32, 64, seed=1), _ints(32, 128, seed=2)
    fused = torch.cat([layout.pack_tile(a), layout.pack_tile(b)], dim=1)
    assert torch.equal(layout.unpack_tile(fused, 32, 192), torch.cat([a, b], dim=1))


def test_layout_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="K % 16 == 0 and N % 64 == 0"):
        layout.pack_tile(_ints(24, 64))
    with pytest.raises(ValueError, match="expected int32"):
        layout.unpack_tile(torch.zeros(2, 128, dtype=torch.int64), 32, 64)
    with pytest.raises(ValueError, match="cannot hold K=40"):
        layout.unpack_rows(torch.zeros(4, 8, dtype=torch.int32), 40)


# ---------------------------------------------------------------- GPTQ

@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_gptq_reader_matches_spec(fmt: str, group: int) -> None:
    k, n = 256, 48
    g = k if group == -1 else group
    q = _ints(k, n, seed=group + 7)
    lo = 1 if fmt == "gptq" else 0
    zeros = torch.randint(lo, 16, (k // g, n), generator=torch.Generator().manual_seed(5))
    scales = (torch.rand(k // g, n) * 0.02 + 0.001).half()
    qweight, qzeros = ref_pack_gptq(q.numpy(), zeros.numpy(), v1=fmt == "gptq")
    w = read_gptq(qweight, qzeros, scales, None, group, fmt)
    assert torch.equal(w.q, q)
    g_idx = torch.arange(k) // g
    torch.testing.assert_close(w.dequantize(), oracle_dequant(q, scales, zeros, g_idx), rtol=0, atol=0)
    # Writing gives back the same tensors bit for bit.
    out = write_gptq(w, fmt)
    assert torch.equal(out["qweight"], qweight) and torch.equal(out["qzeros"], qzeros)
    assert torch.equal(out["scales"], scales) and torch.equal(out["g_idx"], g_idx.int())


def test_gptq_v1_symmetric_is_zero_free() -> None:
    k, n = 64, 16
    q = _ints(k, n)
    qweight, qzeros = ref_pack_gptq(q.numpy(), np.full((2, n), 8), v1=True)
    w = read_gptq(qweight, qzeros, torch.full((2, n), 0.5, dtype=torch.float16), None, 32, "gptq")
    assert w.zeros is None  # symmetric: the kernel's zero-free path
    torch.testing.assert_close(w.dequantize(), (q.float() - 8).t() * 0.5, rtol=0, atol=0)


def test_gptq_v1_zero_sixteen() -> None:
    """v1 stores zero - 1, so a stored nibble 15 is the zero point 16."""
    k, n = 32, 8
    q = _ints(k, n)
    qweight, _ = ref_pack_gptq(q.numpy(), np.ones((1, n)), v1=True)
    qzeros = torch.tensor([[-1]], dtype=torch.int32)  # all nibbles 15
    w = read_gptq(qweight, qzeros, torch.ones(1, n, dtype=torch.float16), None, 32, "gptq")
    torch.testing.assert_close(w.dequantize(), (q.float() - 16).t(), rtol=0, atol=0)


def test_gptq_act_order_g_idx() -> None:
    """desc_act: rows keep their input order, g_idx says each row's group; the loaded linear
    sorts rows by group and permutes the activations to match."""
    k, n, g = 128, 64, 32
    q = _ints(k, n, seed=9)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[perm] = torch.arange(k) // g  # the GPTQ act-order construction
    zeros = torch.randint(1, 16, (k // g, n), generator=torch.Generator().manual_seed(2))
    scales = (torch.rand(k // g, n) + 0.5).half()
    qweight, qzeros = ref_pack_gptq(q.numpy(), zeros.numpy(), v1=True)
    w = read_gptq(qweight, qzeros, scales, g_idx.int(), g, "gptq")
    ref = oracle_dequant(q, scales, zeros, g_idx)
    torch.testing.assert_close(w.dequantize(), ref, rtol=0, atol=0)
    lin = w.to_linear()
    assert lin.weight.perm is not None
    torch.testing.assert_close(lin.dequantize(), ref, rtol=0, atol=0)
    x = torch.randn(3, k)
    torch.testing.assert_close(lin(x), x @ ref.t(), rtol=1e-5, atol=1e-4)


def test_gptq_bad_inputs() -> None:
    q = _ints(64, 16)
    qweight, qzeros = ref_pack_gptq(q.numpy(), np.full((2, 16), 8), v1=True)
    scales = torch.ones(2, 16, dtype=torch.float16)
    with pytest.raises(ModelFormatError, match="3-bit GPTQ is not supported"):
        read_gptq(qweight, qzeros, scales, None, 32, bits=3)
    with pytest.raises(ModelFormatError, match=r"layer\.scales: expected float16 \[2, 16\], got float16 \[4, 16\]"):
        read_gptq(qweight, qzeros, torch.ones(4, 16, dtype=torch.float16), None, 32, name="layer")
    with pytest.raises(ModelFormatError, match=r"qzeros: expected int32 \[1, 2\]"):
        read_gptq(qweight, qzeros, scales[:1], None, 64)
    with pytest.raises(ModelFormatError, match="qweight: expected int32"):
        read_gptq(qweight.float(), qzeros, scales, None, 32)
    with pytest.raises(ModelFormatError, match="group_size 12 is not supported"):
        read_gptq(qweight, qzeros, scales, None, 12)
    with pytest.raises(ModelFormatError, match=r"g_idx: expected int32 \[64\] with values in \[0, 2\)"):
        read_gptq(qweight, qzeros, scales, torch.full((64,), 5, dtype=torch.int32), 32)
    with pytest.raises(ModelFormatError, match="non-finite"):
        read_gptq(qweight, qzeros, torch.full((2, 16), float("nan"), dtype=torch.float16), None, 32)
    with pytest.raises(ModelFormatError, match="checkpoint_format 'marlin'"):
        read_gptq(qweight, qzeros, scales, None, 32, "marlin")
    # A g_idx that is not a grouping of equal size cannot be sorted into contiguous groups.
    uneven = torch.cat([torch.zeros(40), torch.ones(24)]).int()
    w = read_gptq(qweight, qzeros, scales, uneven, 32)
    with pytest.raises(ModelFormatError, match="expected 32 rows per group"):
        w.to_linear()


def test_write_gptq_refuses_unrepresentable_zeros() -> None:
    w = Int4Weight(_ints(32, 8), torch.ones(1, 8), torch.zeros(1, 8), 32)
    with pytest.raises(ValueError, match="do not fit the gptq format"):
        write_gptq(w, "gptq")
    write_gptq(w, "gptq_v2")  # v2 stores the zero itself
    frac = Int4Weight(_ints(32, 8), torch.ones(1, 8), torch.full((1, 8), 2.5), 32)
    with pytest.raises(ValueError, match="fractional"):
        write_gptq(frac)


# ---------------------------------------------------------------- AWQ

@pytest.mark.parametrize("group", [32, 128])
def test_awq_reader_matches_spec(group: int) -> None:
    k, n = 256, 64
    q = _ints(k, n, seed=group)
    zeros = torch.randint(0, 16, (k // group, n), generator=torch.Generator().manual_seed(4)).to(torch.uint8)
    scales = (torch.rand(k // group, n) * 0.1 + 0.01).half()
    w = read_awq(ref_pack_awq(q.numpy()), ref_pack_awq(zeros.numpy()), scales, group)
    assert torch.equal(w.q, q)
    torch.testing.assert_close(w.dequantize(), oracle_dequant(q, scales, zeros, torch.arange(k) // group),
                               rtol=0, atol=0)


def test_awq_bad_inputs() -> None:
    q = _ints(64, 16)
    with pytest.raises(ModelFormatError, match=r"qzeros: expected int32 \[2, 2\]"):
        read_awq(ref_pack_awq(q.numpy()), torch.zeros(1, 2, dtype=torch.int32), torch.ones(2, 16).half(), 32)
    with pytest.raises(ModelFormatError, match="8-bit AWQ"):
        read_awq(ref_pack_awq(q.numpy()), torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 16).half(), 32, bits=8)


# ---------------------------------------------------------------- GGUF Q4_0 / Q4_1

@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_gguf_q4_matches_gguf_package(type_name: str) -> None:
    from gguf import GGMLQuantizationType, quants

    n, k = 24, 96
    x = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    x[3, :32] = 0.25  # a constant block: Q4_1 stores d = 0
    qtype = GGMLQuantizationType[type_name]
    blocks = quants.quantize(x, qtype)
    w = read_gguf_q4(blocks, type_name, k, n)
    ref = torch.from_numpy(quants.dequantize(blocks, qtype).astype(np.float32))
    torch.testing.assert_close(w.dequantize(), ref, rtol=1e-6, atol=1e-6)
    if type_name == "Q4_0":
        assert np.array_equal(write_gguf_q4(w, type_name), blocks)


def test_gguf_q4_1_write_round_trip() -> None:
    n, k = 8, 64
    # Scales with few mantissa bits make the stored min (-zero * scale) exact in fp16.
    scales = torch.randint(1, 64, (k // 32, n)).float() / 64
    zeros = torch.randint(0, 16, (k // 32, n)).float()
    w = Int4Weight(_ints(k, n), scales, zeros, 32)
    back = read_gguf_q4(write_gguf_q4(w, "Q4_1"), "Q4_1", k, n)
    assert torch.equal(back.q, w.q)
    torch.testing.assert_close(back.dequantize(), w.dequantize(), rtol=0, atol=0)


def test_gguf_q4_real_model_tensor(demo_gguf) -> None:
    """SmolLM2's Q4_1 projections decode to exactly what the gguf package dequantises."""
    import gguf

    reader = gguf.GGUFReader(str(demo_gguf))
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    k, n = (int(s) for s in t.shape)
    w = read_gguf_q4(t.data, t.tensor_type.name, k, n)
    ref = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    torch.testing.assert_close(w.dequantize(), ref.reshape(n, k), rtol=1e-6, atol=1e-6)


def test_gguf_q4_k_matches_gguf_package() -> None:
    """Q4_K super-blocks with every kind of code, including the edge ones (scale code 0: a constant
    sub-block; min code 0; both 63), read to what the gguf package dequantises."""
    from gguf import GGMLQuantizationType, quants

    n, s = 6, 3
    rng = np.random.default_rng(1)
    d = rng.uniform(1e-3, 2e-2, (n, s))
    dmin = rng.uniform(1e-3, 2e-2, (n, s))
    sc, mc = rng.integers(0, 64, (n, s, 8)), rng.integers(0, 64, (n, s, 8))
    sc[0, 0, :2] = 0    # constant sub-blocks (with and without an offset)
    mc[0, 0, 1] = 0
    sc[1, 2, 5], mc[1, 2, 5] = 63, 63
    mc[2, 1, :] = 0
    q = rng.integers(0, 16, (n, s * 256))
    blocks = pack_q4k(d, dmin, sc, mc, q)
    w = read_gguf_q4(blocks, "Q4_K", s * 256, n)
    assert w.group_size == 32 and w.scales.shape == (s * 8, n)
    ref = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType.Q4_K).astype(np.float32))
    torch.testing.assert_close(w.dequantize(), ref.reshape(n, s * 256), rtol=1e-6, atol=1e-7)
    # Sub-blocks with a non-zero scale keep their stored nibbles (read in llama.cpp's order).
    keep = torch.from_numpy(np.repeat(sc.reshape(n, s * 8) != 0, 32, axis=1)).t()
    assert torch.equal(w.q[keep], torch.from_numpy(q.astype(np.uint8)).t()[keep])


def test_gguf_q4_k_of_real_weights_stays_close() -> None:
    """A quantized float matrix reads back within one quantization step of the original."""
    x = np.random.default_rng(2).standard_normal((16, 512)).astype(np.float32)
    w = read_gguf_q4(quantize_q4k(x), "Q4_K", 512, 16)
    step = w.scales.abs().repeat_interleave(32, dim=0).t()
    assert bool(((w.dequantize() - torch.from_numpy(x)).abs() <= 0.5 * step + 1e-3).all())


def test_gguf_bad_inputs() -> None:
    blocks = np.zeros((4, 40), dtype=np.uint8)
    with pytest.raises(ModelFormatError, match="Q8_0 is not a 4-bit type.*Q4_0, Q4_1, Q4_K"):
        read_gguf_q4(blocks, "Q8_0", 64, 4)
    with pytest.raises(ModelFormatError, match="Q4_K rows must be a multiple of 256 long, got K=64"):
        read_gguf_q4(blocks, "Q4_K", 64, 4)
    with pytest.raises(ModelFormatError, match="expected 576 for a \\[4, 256\\] weight"):
        read_gguf_q4(np.zeros((4, 140), dtype=np.uint8), "Q4_K", 256, 4)
    inf = pack_q4k(np.full((1, 1), np.inf), np.ones((1, 1)), np.ones((1, 1, 8)), np.ones((1, 1, 8)), np.ones((1, 256)))
    with pytest.raises(ModelFormatError, match="non-finite block scales in Q4_K"):
        read_gguf_q4(inf, "Q4_K", 256, 1)
    with pytest.raises(ModelFormatError, match="expected 160 for a \\[4, 64\\] weight"):
        read_gguf_q4(blocks[:, :30], "Q4_1", 64, 4)
    with pytest.raises(ModelFormatError, match="multiple of 32"):
        read_gguf_q4(blocks, "Q4_1", 48, 4)
