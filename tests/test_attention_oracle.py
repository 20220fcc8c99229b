"""CPU checks of the attention oracle and of the kernel path's input predicate.

The oracle (tests/oracle/attention.py) is what the CUDA kernels are judged against on a GPU, so it
is itself checked here against the op layer's torch path, with its own independent bit packing.
The predicate `_kernels.attention_rejection` decides which calls go to the kernels; its reasons
are device-independent and therefore testable on CPU tensors.
"""
from __future__ import annotations

import pytest
import torch

from edgespec import ops
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
