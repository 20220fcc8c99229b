"""CUDA attention kernels (csrc/kernels/attention.h) against the fp32 oracle on random inputs.

Covers the three phases the engine runs (causal prefill / chunked prefill over a cache prefix,
single-token decode, tree verification), GQA ratios 1/4/7/16, head dims 64 and 128, bf16 and fp16,
odd lengths (1, 19, 99, 989, 4097), cache prefixes up to 32K, random trees up to 300 tokens
(several 64-bit mask words per row) and forced split counts. Every kernel output and split-KV
scratch buffer is poisoned with NaN before the call (so an element the kernels forget to write
fails), and K/V are views of a cache whose slots past S hold NaN (so reading past the end fails).

Tolerance (flash-attention's rule, STYLE.md): max |ours - oracle| <= 2 x max |torch - oracle| +
2 x the rounding error of the oracle in the output dtype, where `torch` is the op layer's torch
path (SDPA) at the same precision on the same GPU. NaN never passes.
"""
from __future__ import annotations

import pytest
import torch

from edgespec import ops
from edgespec.errors import KernelError
from edgespec.ops import _kernels
from kernel_checks import assert_attention_close, attention_inputs
from oracle.attention import pack_bits, random_tree, tree_visibility

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_kernel_outputs")]

DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 128]
GQA = [(4, 4), (8, 2), (7, 1), (16, 1)]  # (Hq, Hkv): ratios 1, 4, 7, 16
MODEL_SHAPES = {"llama3-8b": (32, 8, 128), "minicpm4-8b": (32, 2, 128), "smollm2": (9, 3, 64)}


def _make(t: int, prefix: int, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int):
    return attention_inputs(t, prefix, hq, hkv, d, dtype, seed, "cuda")


_assert_close = assert_attention_close


def _random_tree_mask(t: int, seed: int) -> torch.Tensor:
    return pack_bits(tree_visibility(random_tree(t, torch.Generator().manual_seed(seed)))).cuda()


def _run(q, k, v, scale, mask=None, splits=None) -> torch.Tensor:
    assert _kernels.supports_attention(q, k, v, mask), _kernels.attention_rejection(q, k, v, mask)
    return _kernels.attention(q, k, v, scale, mask, splits=splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("t", [1, 19, 99, 989])
@pytest.mark.parametrize("prefix", [0, 57, 1000])
def test_causal(t: int, prefix: int, hq: int, hkv: int, d: int, dtype: torch.dtype, monkeypatch) -> None:
    q, k, v = _make(t, prefix, hq, hkv, d, dtype, seed=t * 7919 + prefix * 31 + hq + d)
    scale = d ** -0.5
    _assert_close(_run(q, k, v, scale), q, k, v, scale, None, monkeypatch, f"causal T={t} prefix={prefix}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("prefix", [0, 333])
def test_causal_prefill_4097(prefix: int, hq: int, hkv: int, d: int, dtype: torch.dtype, monkeypatch) -> None:
    q, k, v = _make(4097, prefix, hq, hkv, d, dtype, seed=prefix + hq + d)
    scale = d ** -0.5
    _assert_close(_run(q, k, v, scale), q, k, v, scale, None, monkeypatch, f"prefill 4097 prefix={prefix}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
@pytest.mark.parametrize("t", [1, 19])
@pytest.mark.parametrize("prefix", [4096, 32768])
def test_long_context_decode_and_chunk(t: int, prefix: int, model: str, dtype: torch.dtype, monkeypatch) -> None:
    hq, hkv, d = MODEL_SHAPES[model]
    q, k, v = _make(t, prefix, hq, hkv, d, dtype, seed=prefix + t)
    scale = d ** -0.5
    _assert_close(_run(q, k, v, scale), q, k, v, scale, None, monkeypatch, f"{model} T={t} prefix={prefix}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("t", [1, 19, 64, 65, 128, 300])
@pytest.mark.parametrize("prefix", [0, 99, 4097])
def test_tree(t: int, prefix: int, hq: int, hkv: int, d: int, dtype: torch.dtype, monkeypatch) -> None:
    q, k, v = _make(t, prefix, hq, hkv, d, dtype, seed=t * 104729 + prefix + hq)
    mask = _random_tree_mask(t, seed=t + prefix)
    scale = d ** -0.5
    _assert_close(_run(q, k, v, scale, mask), q, k, v, scale, mask, monkeypatch, f"tree T={t} prefix={prefix}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", ["llama3-8b", "minicpm4-8b"])
@pytest.mark.parametrize("t", [64, 128])
def test_tree_at_32k(t: int, model: str, dtype: torch.dtype, monkeypatch) -> None:
    hq, hkv, d = MODEL_SHAPES[model]
    q, k, v = _make(t, 32768, hq, hkv, d, dtype, seed=t)
    mask = _random_tree_mask(t, seed=t)
    _assert_close(_run(q, k, v, d ** -0.5, mask), q, k, v, d ** -0.5, mask, monkeypatch, f"{model} tree {t} @32K")


def test_tree_of_a_chain_equals_causal() -> None:
    # Same inputs, the mask of a chain: the tree kernel must give exactly what causal attention gives
    # up to accumulation order (both use the same tiles and softmax; only the mask source differs).
    q, k, v = _make(40, 500, 8, 2, 128, torch.bfloat16, seed=5)
    chain = pack_bits(tree_visibility([-1] + list(range(39)))).cuda()
    tree_out = _run(q, k, v, 0.1, chain, splits=1).float()
    causal_out = _run(q, k, v, 0.1, None, splits=1).float()
    torch.testing.assert_close(tree_out, causal_out, rtol=0, atol=2e-2)


def test_tree_tokens_do_not_see_siblings() -> None:
    # Two roots, each token seeing only itself: changing token 1's K/V must not move token 0's output.
    q, k, v = _make(2, 300, 4, 1, 64, torch.float16, seed=9)
    mask = pack_bits(torch.eye(2, dtype=torch.bool)).cuda()
    before = _run(q, k, v, 0.125, mask)
    k[-1] += 3.0
    v[-1] -= 2.0
    after = _run(q, k, v, 0.125, mask)
    assert torch.equal(before[0], after[0])
    assert not torch.equal(before[1], after[1])


@pytest.mark.parametrize("t,prefix,tree", [(1, 5000, False), (19, 3000, False), (70, 3000, True), (1, 100, False)])
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 13, 64, 200])
def test_forced_splits(t: int, prefix: int, tree: bool, splits: int, monkeypatch) -> None:
    # Any split count is correct, including more splits than key tiles (empty splits).
    q, k, v = _make(t, prefix, 16, 2, 128, torch.bfloat16, seed=t + splits)
    mask = _random_tree_mask(t, seed=t) if tree else None
    out = _run(q, k, v, 0.09, mask, splits=splits)
    _assert_close(out, q, k, v, 0.09, mask, monkeypatch, f"splits={splits}")


def test_automatic_splits_parallelise_decode() -> None:
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    assert _kernels.attention_splits(1, 32769, 32, 8, False, device) > 1
    assert _kernels.attention_splits(4096, 4096, 32, 8, False, device) == 1
    blocks = 8 * _kernels.attention_splits(1, 131073, 32, 8, False, device)
    assert blocks >= sms, "a long decode should fill the GPU"


def test_query_as_a_view_of_fused_qkv(monkeypatch) -> None:
    # The decoder passes q as a strided view of its fused QKV projection: no copy needed.
    t, hq, hkv, d = 19, 8, 2, 128
    q_full, k, v = _make(t, 200, hq + 2 * hkv, hkv, d, torch.bfloat16, seed=3)
    q = q_full[:, :hq]
    assert not q.is_contiguous()
    _assert_close(_run(q, k, v, d ** -0.5), q, k, v, d ** -0.5, None, monkeypatch, "strided q")


def test_ops_attention_takes_the_kernel_path(monkeypatch) -> None:
    calls = []
    real = _kernels.attention
    monkeypatch.setattr(_kernels, "attention", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    q, k, v = _make(3, 40, 8, 2, 64, torch.float16, seed=1)
    out = ops.attention(q, k, v, 0.125)
    assert len(calls) == 1
    _assert_close(out, q, k, v, 0.125, None, monkeypatch, "ops.attention")
    # Unsupported inputs fall back to the torch path without calling the kernel.
    ops.attention(q.float(), k.float(), v.float(), 0.125)
    q96, k96, v96 = (torch.randn(3, 8, 96, device="cuda", dtype=torch.float16) for _ in range(3))
    ops.attention(q96, k96[:, :2], v96[:, :2], 0.1)
    assert len(calls) == 1


def test_rejections_name_the_problem() -> None:
    q, k, v = _make(3, 40, 8, 2, 64, torch.bfloat16, seed=2)
    assert "dtype" in _kernels.attention_rejection(q.float(), k.float(), v.float())
    assert "head dim" in _kernels.attention_rejection(q[..., :32], k[..., :32], v[..., :32])
    big = _kernels.ATTENTION_MAX_TREE_TOKENS + 1
    qb, kb, vb = _make(big, 0, 4, 4, 64, torch.bfloat16, seed=3)
    mask = torch.zeros(big, (big + 63) // 64, dtype=torch.int64, device="cuda")
    assert "tree" in _kernels.attention_rejection(qb, kb, vb, mask)
    with pytest.raises(ValueError, match="attention"):
        _kernels.attention(q.float(), k.float(), v.float(), 0.1)


def test_cpp_checks_reject_bad_scratch() -> None:
    # The C++ entry point re-checks what Python sent: a split-KV scratch of the wrong shape is
    # refused with a KernelError naming it, before any launch.
    q, k, v = _make(1, 500, 8, 2, 64, torch.bfloat16, seed=4)
    out = torch.empty_like(q)
    lse = torch.empty(3, 8, device="cuda")
    partial = torch.empty(3, 7, 64, device="cuda")  # T * Hq = 8 rows expected
    with pytest.raises(KernelError, match="partial_out"):
        _kernels._run(_kernels._module().attention, _kernels._view(q), _kernels._view(k), _kernels._view(v), None,
                      _kernels._view(out), _kernels._view(partial), _kernels._view(lse), 0.1, 3,
                      _kernels._stream(q))


def test_decoder_forward_matches_torch_path(tiny_model_dir, monkeypatch) -> None:
    """A whole model (head dim 64) on the GPU: prefill, decode and a tree step through the kernels
    give the logits of the torch path."""
    from edgespec.loading import load_model

    path = tiny_model_dir("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                          intermediate_size=512)
    # A random model has no tokenizer: load the model alone.
    model = load_model(str(path), device="cuda", dtype=torch.float16, max_context=256, with_tokenizer=False).model
    tokens = torch.randint(3, 200, (37,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    tree = tree_visibility([-1, 0, 0, 1, 2])
    mask = pack_bits(tree).cuda()

    def run() -> list[torch.Tensor]:
        cache = model.new_cache()
        out = [model.logits(model.forward(tokens[:30], torch.arange(30, device="cuda"), cache, 0).hidden)]
        out.append(model.logits(model.forward(tokens[30:31], torch.tensor([30], device="cuda"), cache, 30).hidden))
        depth = tree.sum(dim=1).cuda() - 1
        out.append(model.logits(model.forward(tokens[31:36], 31 + depth, cache, 31, tree_mask=mask).hidden))
        return out

    kernel_logits = run()
    with monkeypatch.context() as m:
        m.setenv("EDGESPEC_BACKEND", "torch")
        torch_logits = run()
    for ours, ref in zip(kernel_logits, torch_logits):
        assert torch.isfinite(ours).all()
        scale = ref.abs().max().item()
        assert (ours - ref).abs().max().item() <= 2e-2 * scale
