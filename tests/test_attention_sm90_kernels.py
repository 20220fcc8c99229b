"""The Hopper attention kernels (csrc/kernels/sm90/attention.cu: wgmma with 128-byte-swizzled
shared-memory operands; causal prefill / chunks and tree verification, split-KV, device-side
lengths) against the fp32 oracle, with the rule and the poisoned outputs of
test_attention_kernels.py.

On the CPU emulator (`emulated`) the kernels run with tools/cuda_emulator/wgmma.cuh in place of
their PTX: the descriptors, swizzle, fragment layouts and asynchrony as the PTX ISA documents them.
On a GPU (`gpu`) only a compute capability 9.0 device runs them (others skip), at the issue's sizes.
"""
from __future__ import annotations

import pytest
import torch

from edgespec.ops import _kernels
from kernel_checks import (assert_attention_close, assert_schedule_independent, attention_inputs, device_cases,
                           skip_unless_sm90)
from oracle.attention import pack_bits, random_tree, tree_visibility

DTYPES = [torch.bfloat16, torch.float16]
GQA = [(4, 4), (8, 2), (7, 1), (16, 1)]  # (Hq, Hkv): ratios 1, 4, 7, 16
MODEL_SHAPES = {"llama3-8b": (32, 8, 128), "minicpm4-8b": (32, 2, 128), "smollm2": (9, 3, 64)}


@pytest.fixture
def hopper(kernel_device):
    """kernel_device, skipping a GPU that is not compute capability 9.0 or a build without sm90."""
    skip_unless_sm90(kernel_device)
    return kernel_device


def _sm90(q, k, v, scale, mask=None, splits=None, seqlen=None):
    return _kernels.attention(q, k, v, scale, mask, splits=splits, seqlen=seqlen, sm90=True)


def _tree(t: int, seed: int, device) -> torch.Tensor:
    return pack_bits(tree_visibility(random_tree(t, torch.Generator().manual_seed(seed)))).to(device)


# (T, prefix, tree). Causal: one token, a chunk over a prefix that is not a multiple of the 64-key
# tile, one and several 128-row blocks with ragged ends, rows whose diagonal crosses tiles. Trees:
# random, one mask word and several (T > 64), over prefixes off the tile grid.
CASES = device_cases(
    emulated=[(1, 0, False), (19, 57, False), (64, 0, False), (99, 140, False), (130, 5, False),
              (5, 0, True), (13, 100, True), (70, 37, True)],
    gpu=[(t, p, False) for t in (1, 19, 99, 989) for p in (0, 57, 1000)]
    + [(t, p, True) for t in (13, 64, 128, 300) for p in (0, 1000, 4095)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("kernel_device, t, prefix, tree", CASES, indirect=["kernel_device"])
def test_sm90_matches_oracle(hopper, t: int, prefix: int, tree: bool, hq: int, hkv: int, d: int, dtype: torch.dtype,
                             monkeypatch) -> None:
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, dtype, t * 7919 + prefix * 31 + hq + d, hopper)
    mask = _tree(t, t + prefix, hopper) if tree else None
    assert_attention_close(_sm90(q, k, v, d ** -0.5, mask), q, k, v, d ** -0.5, mask, monkeypatch,
                           f"sm90 T={t} prefix={prefix} tree={tree}")


@pytest.mark.parametrize("kernel_device, t, prefix, tree, splits",
                         device_cases(emulated=[(1, 700, False, 5), (40, 300, False, 3), (13, 400, True, 4),
                                                (70, 200, True, 7)],
                                      gpu=[(1, 30000, False, 60), (300, 8000, False, 9), (64, 32000, True, 33)]),
                         indirect=["kernel_device"])
def test_sm90_forced_splits(hopper, t: int, prefix: int, tree: bool, splits: int, monkeypatch) -> None:
    """Split-KV partials merged by the combine kernel, including splits some rows see nothing of
    (a causal chunk's early rows in the last split, tree slots a row does not see)."""
    q, k, v = attention_inputs(t, prefix, 8, 2, 128, torch.bfloat16, splits + t, hopper)
    mask = _tree(t, splits, hopper) if tree else None
    assert_attention_close(_sm90(q, k, v, 0.09, mask, splits=splits), q, k, v, 0.09, mask, monkeypatch,
                           f"sm90 T={t} prefix={prefix} splits={splits}")


@pytest.mark.parametrize("kernel_device, model, t, prefix, tree",
                         device_cases(emulated=[("llama3-8b", 70, 0, False), ("llama3-8b", 64, 150, True)],
                                      gpu=[("llama3-8b", 4096, 0, False), ("llama3-8b", 2048, 30000, False),
                                           ("minicpm4-8b", 4096, 0, False), ("smollm2", 1000, 3000, False),
                                           ("llama3-8b", 64, 32768, True), ("minicpm4-8b", 64, 32768, True)]),
                         indirect=["kernel_device"])
def test_sm90_at_model_shapes(hopper, model: str, t: int, prefix: int, tree: bool, monkeypatch) -> None:
    hq, hkv, d = MODEL_SHAPES[model]
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, torch.bfloat16, 5, hopper)
    mask = _tree(t, 3, hopper) if tree else None
    assert_attention_close(_sm90(q, k, v, d ** -0.5, mask), q, k, v, d ** -0.5, mask, monkeypatch,
                           f"{model} T={t} prefix={prefix} tree={tree}")


@pytest.mark.parametrize("tree", [False, True])
def test_sm90_reads_its_length_on_the_device(hopper, tree: bool, monkeypatch) -> None:
    """A view of 512 slots of which `length` count (NaN past them): the oracle of the first
    `length`, with the split plan of the whole view (what a CUDA graph replays)."""
    t, length = (9, 300) if tree else (70, 400)
    q, k, v = attention_inputs(t, length - t, 8, 2, 128, torch.bfloat16, length, hopper)
    full_k = torch.full((512, 2, 128), float("nan"), dtype=torch.bfloat16, device=hopper)
    full_v = full_k.clone()
    full_k[:length], full_v[:length] = k, v
    mask = _tree(t, 1, hopper) if tree else None
    seqlen = torch.tensor([length], dtype=torch.int32, device=hopper)
    for splits in (None, 1, 5):
        out = _sm90(q, full_k, full_v, 0.09, mask, splits=splits, seqlen=seqlen)
        assert_attention_close(out, q, k, v, 0.09, mask, monkeypatch, f"seqlen {length} splits {splits}")


def test_sm90_takes_a_query_view_of_fused_qkv(hopper, monkeypatch) -> None:
    """q as a strided view (rows of a fused QKV projection), like the decoder passes it."""
    q, k, v = attention_inputs(40, 30, 8, 2, 128, torch.bfloat16, 9, hopper)
    fused = torch.cat([q.reshape(40, -1), torch.randn(40, 512, device=hopper).to(q.dtype)], dim=1)
    view = fused[:, :8 * 128].view(40, 8, 128)
    assert not view.is_contiguous()
    assert_attention_close(_sm90(view, k, v, 0.1), q, k, v, 0.1, None, monkeypatch, "strided q")


def test_sm90_refuses_the_block_sparse_invariant_mode(hopper) -> None:
    """rank_tiles runs on the generic kernels only (the dense chunk_tiles mode runs on both:
    test_invariant_attention_kernels.py); the C++ entry point re-checks."""
    from edgespec.errors import KernelError

    q, k, v = attention_inputs(5, 123, 8, 2, 64, torch.bfloat16, 1, hopper)
    blocks = torch.ones(5, 2, 1, dtype=torch.int64, device=hopper)
    with pytest.raises(ValueError, match="takes neither chunk_tiles nor the sm90 kernels"):
        _kernels.attention(q, k, v, 0.1, block_mask=blocks, sm90=True, rank_tiles=1, splits=1)
    out = torch.empty_like(q)
    with pytest.raises(KernelError, match="takes neither chunk_tiles nor the sm90 kernels"):
        _kernels._run(_kernels._module().attention, _kernels._view(q), _kernels._view(k), _kernels._view(v), None,
                      _kernels._view(out), None, None, 0.1, 1, _kernels._stream(q), _kernels._view(blocks), None, True,
                      0, None, 1)


def test_sm90_split_plan() -> None:
    """128-row blocks, about one per SM; runs of at least two tiles."""
    from edgespec.ops import backend

    module = backend.compiled_module()
    if module is None:
        pytest.skip("needs the compiled extension (or the emulator's)")
    plan = module.attention_sm90_num_splits
    assert plan(4096, 4096, 32, 8, 132) == 1   # 128 row tiles x 8 KV heads: several waves already
    assert plan(64, 32768, 32, 8, 132) == 9    # a 64-token tree: 2 x 8 blocks -> 9 splits, 144 blocks
    assert plan(1, 1000, 32, 8, 132) == 8      # 16 key tiles: runs of 2
    assert plan(64, 4096, 32, 2, 132) == 8     # MiniCPM4: 8 row tiles x 2 heads, 64 tiles in runs of 8
    assert plan(0, 10, 4, 4, 132) == 1 and plan(64, 4096, 32, 8, 0) == 1


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_kernels")
@pytest.mark.parametrize("case", ["prefill", "tree split", "block-sparse prefill"])
def test_emulated_sm90_output_does_not_depend_on_thread_order(case: str, monkeypatch) -> None:
    """A missing barrier, wait or fence between the cp.async copies, the stage refill and the
    asynchronous wgmma reads changes the result under some schedule (the emulator computes a
    wgmma when its group is waited for, reading shared memory then); block-sparse, also between
    the selection words staged in shared memory and their unions."""
    cpu = torch.device("cpu")
    t, prefix, mask, splits = {"prefill": (77, 64, None, 1), "tree split": (70, 150, _tree(70, 2, cpu), 3),
                               "block-sparse prefill": (40, 700, None, 2)}[case]
    q, k, v = attention_inputs(t, prefix, 8, 2, 128, torch.bfloat16, 21, cpu)
    blocks = None
    if case == "block-sparse prefill":  # random selections (bits past a token's blocks are ignored)
        blocks = torch.randint(-2 ** 62, 2 ** 62, (t, 2, 1), generator=torch.Generator().manual_seed(3))
    assert_schedule_independent(
        lambda: _kernels.attention(q, k, v, 0.1, mask, splits=splits, block_mask=blocks, sm90=True), monkeypatch)


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_ops")
def test_ops_attention_takes_the_sm90_kernels_only_when_asked(monkeypatch) -> None:
    """EDGESPEC_SM90_ATTENTION=1 sends calls of 64 packed rows and more (chunks, trees) to the
    Hopper kernels; a draft's decode steps and small trees (row_invariant=False) keep the generic
    kernels; without it nothing changes. A target model's decode steps and trees (row_invariant,
    the default) all go to the Hopper kernels' row-invariant mode, whatever their size, so that
    they agree bit for bit."""
    from edgespec import ops

    calls = []
    real = _kernels.attention

    def spy(*args, sm90=False, **kwargs):
        calls.append(sm90)
        return real(*args, sm90=sm90, **kwargs)

    monkeypatch.setattr(_kernels, "attention", spy)
    cpu = torch.device("cpu")
    chunk = attention_inputs(16, 10, 8, 2, 64, torch.bfloat16, 3, cpu)        # 16 tokens x 4 heads: 64 rows
    decode = attention_inputs(1, 100, 8, 2, 64, torch.bfloat16, 4, cpu)
    small_tree = attention_inputs(13, 10, 8, 2, 64, torch.bfloat16, 5, cpu)   # 52 rows
    big_tree = attention_inputs(20, 10, 8, 2, 64, torch.bfloat16, 6, cpu)
    masks = _tree(13, 1, cpu), _tree(20, 2, cpu)
    for asked in ("0", "1"):
        monkeypatch.setenv("EDGESPEC_SM90_ATTENTION", asked)
        calls.clear()
        out = ops.attention(*chunk, 0.1)
        ops.attention(*decode, 0.1)
        ops.attention(*decode, 0.1, row_invariant=False)
        ops.attention(*small_tree, 0.1, masks[0])
        ops.attention(*small_tree, 0.1, masks[0], row_invariant=False)
        tree_out = ops.attention(*big_tree, 0.1, masks[1], row_invariant=False)
        ops.attention(*big_tree, 0.1, masks[1])
        on = asked == "1"
        assert calls == [on, on, False, on, False, on, on]
        assert_attention_close(out, *chunk, 0.1, None, monkeypatch, f"ops chunk, EDGESPEC_SM90_ATTENTION={asked}")
        assert_attention_close(tree_out, *big_tree, 0.1, masks[1], monkeypatch, f"ops tree, asked={asked}")
    monkeypatch.setenv("EDGESPEC_SM90_ATTENTION", "yes")
    with pytest.raises(ValueError, match="EDGESPEC_SM90_ATTENTION must be 0 or 1"):
        ops.attention(*chunk, 0.1)
