"""CPU checks around the attention kernels: their oracle, predicate, split plan and C++ re-checks.

* The oracle (tests/oracle/attention.py) is what the CUDA kernels are judged against on a GPU
  (tests/test_attention_kernels.py), so it is itself checked here against the op layer's torch path,
  with its own independent bit packing.
* `_kernels.attention_rejection` decides which calls go to the kernels; its reasons are
  device-independent and therefore testable on CPU tensors.
* When the extension is built (nvcc present, no GPU needed), the split plan and the C++ entry
  point's re-checks run on the host: the checks reject bad views before any CUDA call, so fake
  device addresses are enough.
"""
from __future__ import annotations

import pytest
import torch

from edgespec import errors, ops
from edgespec.ops import _kernels
from oracle.attention import (attention_ref, mask_words, pack_bits, random_tree, tree_visibility,
                              unpack_bits, visibility)


def _qkv(t: int, s: int, hq: int, hkv: int, d: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    k = torch.randn(s, hkv, d, generator=g).to(dtype)
    v = torch.randn(s, hkv, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("num_tokens", [1, 5, 63, 64, 65, 130])
def test_pack_bits_matches_library_packing(num_tokens: int) -> None:
    dense = tree_visibility(random_tree(num_tokens, torch.Generator().manual_seed(num_tokens)))
    packed = pack_bits(dense)
    assert packed.shape == (num_tokens, mask_words(num_tokens))
    assert torch.equal(packed, ops.pack_tree_mask(dense))
    assert torch.equal(unpack_bits(packed, num_tokens), dense)
    assert torch.equal(ops.unpack_tree_mask(packed, num_tokens), dense)


def test_bit_63_is_the_sign_bit() -> None:
    dense = torch.zeros(64, 64, dtype=torch.bool)
    dense[63, 63] = True
    packed = pack_bits(dense)
    assert int(packed[63, 0]) == -(1 << 63)
    assert int(packed[62, 0]) == 0


def test_random_tree_is_topological_and_deep() -> None:
    parents = random_tree(128, torch.Generator().manual_seed(0))
    assert all(-1 <= p < i for i, p in enumerate(parents))
    vis = tree_visibility(parents)
    depth = vis.sum(dim=1)
    assert int(depth.max()) >= 8, "random trees should contain long ancestor chains"
    assert (parents.count(-1)) >= 2, "random trees should contain several roots"
    assert torch.equal(vis.diagonal(), torch.ones(128, dtype=torch.bool))


def test_causal_visibility_is_lower_triangular_after_the_prefix() -> None:
    vis = visibility(3, 7)
    expected = torch.tensor([[1, 1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(vis, expected)


@pytest.mark.parametrize("t,s,hq,hkv,d", [(1, 1, 4, 4, 16), (1, 37, 8, 2, 32), (19, 19, 7, 1, 64),
                                          (19, 120, 16, 1, 16), (33, 70, 6, 2, 24)])
def test_oracle_matches_torch_path_causal(t: int, s: int, hq: int, hkv: int, d: int) -> None:
    q, k, v = _qkv(t, s, hq, hkv, d, seed=t * 1000 + s)
    scale = d ** -0.5
    ref = attention_ref(q, k, v, scale)
    ours = ops.attention(q, k, v, scale)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,prefix,hq,hkv", [(1, 0, 4, 1), (19, 40, 8, 2), (70, 0, 4, 4), (130, 17, 7, 1)])
def test_oracle_matches_torch_path_tree(t: int, prefix: int, hq: int, hkv: int) -> None:
    d = 32
    q, k, v = _qkv(t, prefix + t, hq, hkv, d, seed=t + prefix)
    mask = pack_bits(tree_visibility(random_tree(t, torch.Generator().manual_seed(t))))
    ref = attention_ref(q, k, v, 0.3, tree_mask=mask)
    ours = ops.attention(q, k, v, 0.3, tree_mask=mask)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_oracle_tree_of_a_chain_equals_causal() -> None:
    # A chain (each token's parent is the previous one) is exactly causal attention.
    t, prefix = 21, 9
    q, k, v = _qkv(t, prefix + t, 4, 2, 16, seed=3)
    chain = pack_bits(tree_visibility([-1] + list(range(t - 1))))
    torch.testing.assert_close(attention_ref(q, k, v, 0.25, tree_mask=chain), attention_ref(q, k, v, 0.25))


# --- the kernel path's predicate ---------------------------------------------------------------------

def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(torch.bfloat16)


@pytest.mark.cpu_paths
def test_rejection_reasons_name_the_problem() -> None:
    q, k = _bf16(3, 8, 64), _bf16(40, 2, 64)
    assert "dtype" in _kernels.attention_rejection(q.float(), k.float(), k.float())
    assert "dtype" in _kernels.attention_rejection(q, k.half(), k)
    assert "head dim 96" in _kernels.attention_rejection(_bf16(3, 8, 96), _bf16(40, 2, 96), _bf16(40, 2, 96))
    assert "multiple of Hkv" in _kernels.attention_rejection(_bf16(3, 7, 64), k, k)
    assert "T <= S" in _kernels.attention_rejection(_bf16(50, 8, 64), k, k)
    mask = ops.pack_tree_mask(torch.eye(3, dtype=torch.bool))
    assert "int64 [3, 1]" in _kernels.attention_rejection(q, k, k, mask.int())
    big = _kernels.ATTENTION_MAX_TREE_TOKENS + 1
    big_mask = torch.zeros(big, (big + 63) // 64, dtype=torch.int64)
    assert "limit" in _kernels.attention_rejection(_bf16(big, 2, 64), _bf16(big, 2, 64), _bf16(big, 2, 64), big_mask)
    # K/V are never copied, so their strides must suit the 16-byte loads; a strided q is copied.
    odd = _bf16(40, 2, 68)[..., :64]
    assert "multiples of 8" in _kernels.attention_rejection(q, odd, k)
    assert "stride" in _kernels.attention_rejection(q, k.transpose(1, 2).contiguous().transpose(1, 2), k)
    # Well-formed CPU tensors, including a strided q and a KV-cache view, are rejected only for the device.
    cache = _bf16(2, 100, 2, 64)
    assert "not a CUDA device" in _kernels.attention_rejection(_bf16(3, 12, 64)[:, :8], cache[1, :40], cache[0, :40])
    assert "not a CUDA device" in _kernels.attention_rejection(q, k, k, mask)
    assert not _kernels.supports_attention(q, k, k, mask)


# --- with the extension: split plan and C++ re-checks (host only) -------------------------------------

_C = ops.compiled_module()
needs_extension = pytest.mark.skipif(_C is None, reason="edgespec._C was not built (no CUDA compiler)")


@needs_extension
@pytest.mark.parametrize("sms", [46, 108, 132, 142])
def test_split_plan(sms: int) -> None:
    tiles = lambda s: -(-s // 64)  # noqa: E731 - keys per tile in csrc/kernels/attention.h
    # Decode: enough (KV head x split) blocks to fill the GPU once the context is long enough.
    for hkv, ctx in [(8, 32769), (2, 131073), (8, 4097)]:
        splits = _C.attention_num_splits(1, ctx, 32, hkv, False, sms)
        assert 1 < splits <= tiles(ctx) // 2 + 1
        assert hkv * splits >= min(sms, hkv * tiles(ctx) // 2)
    # Prefill with many row tiles never splits; unknown SM counts never split.
    assert _C.attention_num_splits(4096, 4096, 32, 8, False, sms) == 1
    assert _C.attention_num_splits(1, 32769, 32, 8, False, 0) == 1
    # Tree verification splits too, and never into empty key ranges.
    splits = _C.attention_num_splits(64, 32832, 32, 8, True, sms)
    per_split = -(-tiles(32832) // splits)
    assert splits > 1 and (splits - 1) * per_split < tiles(32832)


_BASE = 1 << 32  # fake, well-aligned device addresses; never dereferenced


def _fake(shape: tuple[int, ...], dtype: str = "bf16", offset: int = 0, strides: tuple[int, ...] | None = None):
    if strides is None:
        strides = tuple(int(torch.tensor(shape[i + 1:]).prod()) for i in range(len(shape)))
    return _C.TensorView(_BASE + offset, shape, strides, getattr(_C.DType, dtype), 0)


def _attention_error(q, k, v, mask=None, out=None, partial=None, lse=None, splits=1, scale=0.125) -> str:
    out = out if out is not None else _fake(tuple(q.shape), q.dtype.name, offset=1 << 30)
    with pytest.raises(errors.KernelError) as info:
        _kernels._run(_C.attention, q, k, v, mask, out, partial, lse, scale, splits, 0)
    return str(info.value)


@needs_extension
@pytest.mark.cpu_paths
def test_attention_rechecks_in_cpp() -> None:
    q, k, v = _fake((3, 8, 64)), _fake((40, 2, 64), offset=1 << 20), _fake((40, 2, 64), offset=1 << 24)
    msg = _attention_error(_fake((3, 8, 96)), _fake((40, 2, 96), offset=1 << 20), _fake((40, 2, 96), offset=1 << 24))
    assert msg.startswith("attention: unsupported: q: head dim 96") and "k=bf16[40, 2, 96]" in msg
    assert "k: expected dtype bf16" in _attention_error(q, _fake((40, 2, 64), "fp16", 1 << 20), v)
    assert "not a multiple of the 3 KV heads" in _attention_error(q, _fake((40, 3, 64), offset=1 << 20),
                                                                   _fake((40, 3, 64), offset=1 << 24))
    assert "cannot hold the 3 new tokens" in _attention_error(q, _fake((2, 2, 64), offset=1 << 20),
                                                              _fake((2, 2, 64), offset=1 << 24))
    misaligned = _fake((40, 2, 64), offset=(1 << 20) + 2)
    assert "16-byte aligned" in _attention_error(q, misaligned, v)
    assert "multiple of 8" in _attention_error(q, _fake((40, 2, 64), offset=1 << 20, strides=(132, 66, 1)), v)
    assert "overlaps k" in _attention_error(q, k, v, out=_fake((3, 8, 64), offset=1 << 20))
    assert "tree_mask: dim 1 has size 2" in _attention_error(q, k, v, mask=_fake((3, 2), "int64", 1 << 28))
    assert "tree_mask: expected dtype int64" in _attention_error(q, k, v, mask=_fake((3, 1), "int32", 1 << 28))
    assert "splits must be in [1, 1024]" in _attention_error(q, k, v, splits=0)
    assert "needs both partial_out and partial_lse" in _attention_error(q, k, v, splits=3)
    partial, lse = _fake((3, 24, 64), "fp32", 1 << 28), _fake((3, 24), "fp32", 1 << 29)
    assert "pass none with splits 1" in _attention_error(q, k, v, partial=partial, lse=lse)
    msg = _attention_error(q, k, v, partial=_fake((3, 23, 64), "fp32", 1 << 28), lse=lse, splits=3)
    assert "partial_out: dim 1 has size 23, expected 24" in msg
    assert "scale must be finite" in _attention_error(q, k, v, scale=float("inf"))
