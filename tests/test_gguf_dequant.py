"""GGUF dequantisation in torch (edgespec.loading.gguf_dequant) against the `gguf` package's numpy
decoder, bit for bit: every supported type on random blocks (random bytes, finite non-zero fp16
scales) of several block counts and row shapes, across the decoder's step boundaries, on odd
storage offsets; the numpy fallback for the other types; clear errors for short buffers; and the
demo model's weights through GGUFSource equal to the numpy path's."""
from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edgespec import load_model
from edgespec.errors import ModelFormatError
from edgespec.loading import gguf_dequant
from edgespec.loading.gguf_dequant import dequantize, raw_bytes
from edgespec.loading.gguf_file import GGUFSource
from gguf_cases import QT, TYPES, random_raw, reference

# (rows, blocks per row); a 3-D case as well: GGUF stores expert stacks that way.
SHAPES = [(1, 1), (3, 5), (7, 2), (2, 3, 3)]


def torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A SHAPES entry as a tensor shape: the last dimension counts blocks, scaled to elements."""
    block = gguf.GGML_QUANT_SIZES[QT[name]][0]
    return (*shape[:-1], shape[-1] * block)


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    diff = (got.contiguous().view(torch.int32) != want.contiguous().view(torch.int32))
    assert not diff.any(), f"{int(diff.sum())} of {diff.numel()} elements differ, first at flat index " \
                           f"{int(diff.flatten().nonzero()[0])}: {got.flatten()[diff.flatten()][:4]} vs " \
                           f"{want.flatten()[diff.flatten()][:4]}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", TYPES)
def test_bit_equal_to_gguf_numpy(name: str, shape: tuple[int, ...]) -> None:
    t_shape = torch_shape(name, shape)
    nblocks = math.prod(t_shape) // gguf.GGML_QUANT_SIZES[QT[name]][0]
    raw = random_raw(name, nblocks, seed=len(TYPES) * nblocks + TYPES.index(name))
    want = reference(raw, name, t_shape)
    if name != "BF16" and name != "F32":  # random bits there hold NaNs and infinities on purpose
        assert torch.isfinite(want).all() and (want != 0).any()
    got = dequantize(torch.from_numpy(raw).reshape(-1), QT[name], t_shape)
    assert_bit_equal(got, want)


@pytest.mark.parametrize("name", TYPES)
def test_across_step_boundaries(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded in steps of 2 blocks (the last one short) into a NaN-poisoned output: every block
    is written, in its place."""
    block = gguf.GGML_QUANT_SIZES[QT[name]][0]
    monkeypatch.setitem(gguf_dequant._STEP_ELEMENTS, "cpu", 2 * block + 1)
    empty = gguf_dequant._empty
    monkeypatch.setattr(gguf_dequant, "_empty", lambda *args: empty(*args).fill_(float("nan")))
    raw = random_raw(name, 7, seed=99)
    assert_bit_equal(dequantize(torch.from_numpy(raw), QT[name], (7, block)), reference(raw, name, (7, block)))


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "Q4_K"])
def test_odd_storage_offset(name: str) -> None:
    """Raw bytes that start at an odd offset of their storage (a slice) decode the same."""
    raw = random_raw(name, 6, seed=5)
    padded = torch.cat([torch.zeros(1, dtype=torch.uint8), torch.from_numpy(raw).reshape(-1)])[1:]
    assert padded.storage_offset() == 1
    shape = torch_shape(name, (2, 3))
    assert_bit_equal(dequantize(padded, QT[name], shape), reference(raw, name, shape))


def test_unsupported_type_falls_back_to_numpy() -> None:
    assert not gguf_dequant.supported(QT.IQ4_NL) and gguf_dequant.supported(QT.Q4_K)
    raw = random_raw("Q4_0", 6, seed=3)  # IQ4_NL blocks are laid out as Q4_0's: fp16 d, 16 bytes
    want = torch.from_numpy(gguf.quants.dequantize(raw.reshape(2, -1), QT.IQ4_NL).copy())
    assert_bit_equal(dequantize(torch.from_numpy(raw), QT.IQ4_NL, (2, 96)), want)


def test_type_nothing_decodes() -> None:
    block, size = gguf.GGML_QUANT_SIZES[QT.Q8_K]
    raw = torch.zeros(2 * size, dtype=torch.uint8)
    with pytest.raises(ModelFormatError, match=r"blk\.0\.x: GGUF type Q8_K cannot be dequantised"):
        dequantize(raw, QT.Q8_K, (2, block), name="blk.0.x")


@pytest.mark.parametrize("name", TYPES + ["IQ4_NL"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_byte_count(name: str, delta: int) -> None:
    block, size = gguf.GGML_QUANT_SIZES[QT[name]]
    raw = torch.zeros(3 * size + delta, dtype=torch.uint8)
    with pytest.raises(ModelFormatError, match=rf"f\.gguf: t: {3 * size + delta} bytes of {name} data, expected "
                                               rf"{3 * size} for shape \[3, {block}\] \(3 blocks of {size} bytes\)"):
        dequantize(raw, QT[name], (3, block), name="f.gguf: t")


def test_empty_buffer_and_partial_rows() -> None:
    with pytest.raises(ModelFormatError, match=r"0 bytes of Q6_K data, expected 420"):
        dequantize(torch.zeros(0, dtype=torch.uint8), QT.Q6_K, (2, 256))
    with pytest.raises(ModelFormatError, match=r"rows of 100 elements are not whole Q4_0 blocks of 32"):
        dequantize(torch.zeros(200, dtype=torch.uint8), QT.Q4_0, (4, 100))
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(9, dtype=torch.int8), QT.Q8_0, (1, 32))
    assert dequantize(torch.zeros(0, dtype=torch.uint8), QT.Q4_K, (0, 256)).shape == (0, 256)


def test_raw_bytes_shares_the_file_view() -> None:
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    data.flags.writeable = False  # as GGUFTensor.data: a read-only view of the file
    raw = raw_bytes(data)
    assert raw.dtype == torch.uint8 and raw.numel() == 48
    assert raw.data_ptr() == data.ctypes.data
    assert_bit_equal(dequantize(raw, QT.F32, (3, 4)), torch.from_numpy(data.copy()))


@pytest.fixture
def one_thread():
    """One intra-op thread for the demo-model tests: their results do not depend on it, and on a
    shared 2-core machine OpenMP's spinning threads, competing with another process's, stretched
    each from ~2 s to over 20 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_demo_weights_equal_the_numpy_path(demo_gguf: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    """Every tensor of the demo (Q4_1, Q8_0 and F32; llama Q/K un-permuted) is bit-identical
    through torch and through gguf's numpy decoder (every type sent to the fallback)."""
    source = GGUFSource(demo_gguf)
    ours = {name: source.tensor(name) for name in source.names()}
    assert {source.raw(n).tensor_type.name for n in ours} >= {"Q4_1", "Q8_0", "F32"}
    monkeypatch.setattr(gguf_dequant, "_FORMATS", {})
    for name, w in ours.items():
        assert_bit_equal(w, source.tensor(name))


@pytest.mark.parametrize("quantized", [False, True])
def test_loader_reads_every_weight_for_its_device(demo_gguf: Path, monkeypatch: pytest.MonkeyPatch,
                                                  quantized: bool, one_thread) -> None:
    """load_model names its device to every GGUFSource.tensor call (also through the 4-bit import's
    wrapper), so a CUDA load decodes on the GPU: a call that left it out would decode on the host."""
    calls = []
    tensor = GGUFSource.tensor

    def spy(self, name: str, device=None) -> torch.Tensor:
        calls.append((name, device))
        return tensor(self, name, device)

    monkeypatch.setattr(GGUFSource, "tensor", spy)
    load_model(demo_gguf, device="cpu", dtype=torch.float32, max_context=16, with_tokenizer=False,
               quantized=quantized)
    assert any(name == "model.embed_tokens.weight" for name, _ in calls)
    assert len(calls) > (5 if quantized else 200)
    assert all(device == torch.device("cpu") for _, device in calls), [c for c in calls if c[1] is None][:3]


@pytest.mark.gpu
@pytest.mark.parametrize("name", TYPES)
def test_on_cuda(name: str) -> None:
    """The same decoders on a GPU: bytes on the device, float32 out on it, bit-identical to numpy
    (no FMA contraction: each product and sum is its own kernel)."""
    shape = torch_shape(name, (5, 3))
    raw = random_raw(name, 15, seed=11)
    got = dequantize(torch.from_numpy(raw).cuda(), QT[name], shape)
    assert got.device.type == "cuda"
    assert_bit_equal(got.cpu(), reference(raw, name, shape))
