"""CUDA attention kernels (csrc/kernels/attention.h) against the fp32 oracle on random inputs.

One body per check for both targets (the `kernel_device` fixture, or `device_cases` where the
sizes differ): the CPU emulator (`emulated`, every case it runs in seconds) and a GPU (`gpu`,
skipped without one, at the issue's full sizes). Covers the three phases the engine runs (causal
prefill / chunked prefill over a cache prefix, single-token decode, tree verification), GQA ratios
1/4/7/16, head dims 64 and 128, bf16 and fp16, odd lengths (1, 19, 99, 989, 4097), cache prefixes
up to 32K, random trees up to 300 tokens (several 64-bit mask words per row) and forced split
counts. Every kernel output and split-KV scratch buffer is poisoned with NaN before the call (so an
element the kernels forget to write fails), and K/V are views of a cache whose slots past S hold
NaN (so reading past the end fails).

Tolerance (flash-attention's rule, STYLE.md): max |ours - oracle| <= 2 x max |torch - oracle| +
2 x the rounding error of the oracle in the output dtype, where `torch` is the op layer's torch
path (SDPA) at the same precision on the same device. NaN never passes.
"""
from __future__ import annotations

import pytest
import torch

from edgespec import ops
from edgespec.errors import KernelError
from edgespec.ops import _kernels
from kernel_checks import (assert_attention_close, assert_schedule_independent, attention_inputs, device_cases,
                           use_attention_family)
from oracle.attention import pack_bits, random_tree, tree_visibility

DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 128]
GQA = [(4, 4), (8, 2), (7, 1), (16, 1)]  # (Hq, Hkv): ratios 1, 4, 7, 16
MODEL_SHAPES = {"llama3-8b": (32, 8, 128), "minicpm4-8b": (32, 2, 128), "smollm2": (9, 3, 64)}

_assert_close = assert_attention_close


def _tree_mask(t: int, seed: int, device: torch.device) -> torch.Tensor:
    return pack_bits(tree_visibility(random_tree(t, torch.Generator().manual_seed(seed)))).to(device)


def _run(q, k, v, scale, mask=None, splits=None) -> torch.Tensor:
    assert _kernels.supports_attention(q, k, v, mask), _kernels.attention_rejection(q, k, v, mask)
    return _kernels.attention(q, k, v, scale, mask, splits=splits)


# (T, prefix): decode with and without a prefix, a 19-token chunk, 99 tokens over a prefix (two
# row tiles); on the GPU also 989 tokens and a 1000-token prefix.
CAUSAL = device_cases(emulated=[(1, 0), (1, 300), (19, 0), (19, 57), (99, 140)],
                      gpu=[(t, p) for t in (1, 19, 99, 989) for p in (0, 57, 1000)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("kernel_device, t, prefix", CAUSAL, indirect=["kernel_device"])
def test_causal(kernel_device, t: int, prefix: int, hq: int, hkv: int, d: int, dtype: torch.dtype,
                monkeypatch) -> None:
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, dtype, t * 7919 + prefix * 31 + hq + d, kernel_device)
    _assert_close(_run(q, k, v, d ** -0.5), q, k, v, d ** -0.5, None, monkeypatch, f"causal T={t} prefix={prefix}")


# A prefill spanning many query tiles, key tiles cut by the diagonal: 389 tokens over 211 on the
# emulator, 4097 over 0 and 333 on the GPU.
PREFILL = device_cases(emulated=[(389, 211, hq, hkv, d) for hq, hkv, d in [(8, 2, 128), (16, 1, 64), (7, 1, 64)]],
                       gpu=[(4097, p, hq, hkv, d) for p in (0, 333) for hq, hkv in GQA for d in HEAD_DIMS])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel_device, t, prefix, hq, hkv, d", PREFILL, indirect=["kernel_device"])
def test_prefill_spanning_many_tiles(kernel_device, t: int, prefix: int, hq: int, hkv: int, d: int,
                                     dtype: torch.dtype, monkeypatch) -> None:
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, dtype, prefix + hq + d, kernel_device)
    _assert_close(_run(q, k, v, d ** -0.5), q, k, v, d ** -0.5, None, monkeypatch, f"prefill {t} prefix={prefix}")


# Long contexts with the models' attention shapes: a 32K decode (32 and 128 planned splits on 132
# SMs) on both; on the GPU every model at 4K and 32K, one token and a 19-token chunk, both dtypes.
LONG = device_cases(emulated=[(m, 1, 32767, torch.bfloat16) for m in ("llama3-8b", "minicpm4-8b")],
                    gpu=[(m, t, p, dt) for m in MODEL_SHAPES for t in (1, 19) for p in (4096, 32768) for dt in DTYPES])


@pytest.mark.slow
@pytest.mark.parametrize("kernel_device, model, t, prefix, dtype", LONG, indirect=["kernel_device"])
def test_long_context_decode_and_chunk(kernel_device, model: str, t: int, prefix: int, dtype: torch.dtype,
                                       monkeypatch) -> None:
    hq, hkv, d = MODEL_SHAPES[model]
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, dtype, prefix + t, kernel_device)
    _assert_close(_run(q, k, v, d ** -0.5), q, k, v, d ** -0.5, None, monkeypatch, f"{model} T={t} prefix={prefix}")


TREES = device_cases(emulated=[(t, p, hq, hkv, d) for t in (1, 19, 64, 65, 128) for p in (0, 99)
                               for hq, hkv, d in [(8, 2, 128), (4, 4, 64), (16, 1, 128)]],
                     gpu=[(t, p, hq, hkv, d) for t in (1, 19, 64, 65, 128, 300) for p in (0, 99, 4097)
                          for hq, hkv in GQA for d in HEAD_DIMS])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel_device, t, prefix, hq, hkv, d", TREES, indirect=["kernel_device"])
def test_tree(kernel_device, t: int, prefix: int, hq: int, hkv: int, d: int, dtype: torch.dtype, monkeypatch) -> None:
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, dtype, t * 104729 + prefix + hq, kernel_device)
    mask = _tree_mask(t, t + prefix, kernel_device)
    _assert_close(_run(q, k, v, d ** -0.5, mask), q, k, v, d ** -0.5, mask, monkeypatch, f"tree T={t} prefix={prefix}")


# The tree shapes: 64 tokens at 4K (emulator), 64 and 128 at 32K (GPU), Llama and MiniCPM4.
TREES_LONG = device_cases(emulated=[(m, 64, 4032, torch.bfloat16) for m in ("llama3-8b", "minicpm4-8b")],
                          gpu=[(m, t, 32768, dt) for m in ("llama3-8b", "minicpm4-8b") for t in (64, 128)
                               for dt in DTYPES])


@pytest.mark.slow
@pytest.mark.parametrize("kernel_device, model, t, prefix, dtype", TREES_LONG, indirect=["kernel_device"])
def test_tree_at_long_context(kernel_device, model: str, t: int, prefix: int, dtype: torch.dtype,
                              monkeypatch) -> None:
    hq, hkv, d = MODEL_SHAPES[model]
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, dtype, t + hkv, kernel_device)
    mask = _tree_mask(t, t, kernel_device)
    _assert_close(_run(q, k, v, d ** -0.5, mask), q, k, v, d ** -0.5, mask, monkeypatch, f"{model} tree {t} @{prefix}")


SPLIT_CASES = device_cases(emulated=[(1, 700, False), (19, 300, False), (70, 300, True), (1, 40, False)],
                           gpu=[(1, 5000, False), (19, 3000, False), (70, 3000, True), (1, 100, False)])


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 13, 64, 200])
@pytest.mark.parametrize("kernel_device, t, prefix, tree", SPLIT_CASES, indirect=["kernel_device"])
def test_forced_splits(kernel_device, t: int, prefix: int, tree: bool, splits: int, monkeypatch) -> None:
    # Any split count is correct, including more splits than key tiles (empty splits).
    q, k, v = attention_inputs(t, prefix, 16, 2, 128, torch.bfloat16, t + splits, kernel_device)
    mask = _tree_mask(t, t, kernel_device) if tree else None
    _assert_close(_run(q, k, v, 0.09, mask, splits=splits), q, k, v, 0.09, mask, monkeypatch, f"splits={splits}")


def test_automatic_splits_on_a_long_decode(kernel_device, monkeypatch) -> None:
    # A 4K decode with 2 KV heads is split (132 SMs on the emulator: an H100), and every split is
    # correct; a long decode fills the GPU, a long prefill is not split.
    q, k, v = attention_inputs(1, 4095, 32, 2, 128, torch.bfloat16, 11, kernel_device)
    assert _kernels.attention_splits(1, 4096, 32, 2, False, q.device) > 1
    assert _kernels.attention_splits(4096, 4096, 32, 8, False, q.device) == 1
    assert 8 * _kernels.attention_splits(1, 131073, 32, 8, False, q.device) >= _kernels._sm_count(q.device.index or 0)
    _assert_close(_run(q, k, v, 0.09), q, k, v, 0.09, None, monkeypatch, "auto splits")


def test_tree_of_a_chain_equals_causal(kernel_device) -> None:
    # Same inputs, the mask of a chain: the tree kernel must give what causal attention gives up to
    # accumulation order (both use the same tiles and softmax; only the mask source differs).
    q, k, v = attention_inputs(40, 500, 8, 2, 128, torch.bfloat16, 5, kernel_device)
    chain = pack_bits(tree_visibility([-1] + list(range(39)))).to(kernel_device)
    tree_out = _run(q, k, v, 0.1, chain, splits=1).float()
    causal_out = _run(q, k, v, 0.1, None, splits=1).float()
    torch.testing.assert_close(tree_out, causal_out, rtol=0, atol=2e-2)


def test_tree_tokens_do_not_see_siblings(kernel_device) -> None:
    # Two roots, each token seeing only itself: changing token 1's K/V must not move token 0's output.
    q, k, v = attention_inputs(2, 300, 4, 1, 64, torch.float16, 9, kernel_device)
    mask = pack_bits(torch.eye(2, dtype=torch.bool)).to(kernel_device)
    before = _run(q, k, v, 0.125, mask)
    k[-1] += 3.0
    v[-1] -= 2.0
    after = _run(q, k, v, 0.125, mask)
    assert torch.equal(before[0], after[0])
    assert not torch.equal(before[1], after[1])


def test_query_as_a_view_of_fused_qkv(kernel_device, monkeypatch) -> None:
    # The decoder passes q as a strided view of its fused QKV projection: no copy needed.
    t, hq, hkv, d = 19, 8, 2, 128
    q_full, k, v = attention_inputs(t, 200, hq + 2 * hkv, hkv, d, torch.bfloat16, 3, kernel_device)
    q = q_full[:, :hq]
    assert not q.is_contiguous()
    _assert_close(_run(q, k, v, d ** -0.5), q, k, v, d ** -0.5, None, monkeypatch, "strided q")


def test_rejections_name_the_problem(kernel_device) -> None:
    q, k, v = attention_inputs(3, 40, 8, 2, 64, torch.bfloat16, 2, kernel_device)
    assert "dtype" in _kernels.attention_rejection(q.float(), k.float(), v.float())
    assert "head dim" in _kernels.attention_rejection(q[..., :32], k[..., :32], v[..., :32])
    big = _kernels.ATTENTION_MAX_TREE_TOKENS + 1
    qb, kb, vb = attention_inputs(big, 0, 4, 4, 64, torch.bfloat16, 3, kernel_device)
    mask = torch.zeros(big, (big + 63) // 64, dtype=torch.int64, device=kernel_device)
    assert "tree" in _kernels.attention_rejection(qb, kb, vb, mask)
    with pytest.raises(ValueError, match="attention"):
        _kernels.attention(q.float(), k.float(), v.float(), 0.1)


def test_cpp_checks_reject_bad_scratch(kernel_device) -> None:
    # The C++ entry point re-checks what Python sent: a split-KV scratch of the wrong shape is
    # refused with a KernelError naming it, before any launch.
    q, k, v = attention_inputs(1, 500, 8, 2, 64, torch.bfloat16, 4, kernel_device)
    out = torch.empty_like(q)
    lse = torch.empty(3, 8, device=kernel_device)
    partial = torch.empty(3, 7, 64, device=kernel_device)  # T * Hq = 8 rows expected
    with pytest.raises(KernelError, match="partial_out"):
        _kernels._run(_kernels._module().attention, _kernels._view(q), _kernels._view(k), _kernels._view(v), None,
                      _kernels._view(out), _kernels._view(partial), _kernels._view(lse), 0.1, 3,
                      _kernels._stream(q))


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_kernels")
@pytest.mark.parametrize("case", ["prefill", "tree", "split decode"])
def test_emulated_output_does_not_depend_on_thread_order(case: str, monkeypatch) -> None:
    # Emulator only. Between two barriers the emulator runs a block's threads in the schedule's
    # order; a race changes the result: round-robin schedules land cp.async copies late (a tile
    # read before its wait is stale), serial ones let one warp run ahead with copies landing at
    # once (a stage refilled before every warp is done with it). Removing either barrier of the
    # main loop fails here.
    cpu = torch.device("cpu")
    t, prefix, mask, splits = {"prefill": (77, 64, None, 1), "tree": (65, 40, _tree_mask(65, 1, cpu), 1),
                               "split decode": (1, 900, None, 5)}[case]
    q, k, v = attention_inputs(t, prefix, 8, 2, 128, torch.bfloat16, 21, cpu)
    assert_schedule_independent(lambda: _run(q, k, v, 0.1, mask, splits=splits), monkeypatch)


# Decoded and verified rows bitwise equal (the row-invariant mode): test_invariant_attention_kernels.py.


# --- GPU only: the op layer and a whole model -------------------------------------------------------

def test_ops_attention_takes_the_kernel_path(kernel_device, monkeypatch) -> None:
    if kernel_device.type != "cuda":
        pytest.skip("the op layer takes the kernels for CUDA tensors (emulated: test_emulated_model.py)")
    calls = []
    real = _kernels.attention
    monkeypatch.setattr(_kernels, "attention", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    q, k, v = attention_inputs(3, 40, 8, 2, 64, torch.float16, 1, kernel_device)
    out = ops.attention(q, k, v, 0.125)
    assert len(calls) == 1
    _assert_close(out, q, k, v, 0.125, None, monkeypatch, "ops.attention")
    # Unsupported inputs fall back to the torch path without calling the kernel.
    ops.attention(q.float(), k.float(), v.float(), 0.125)
    q96, k96, v96 = (torch.randn(3, 8, 96, device="cuda", dtype=torch.float16) for _ in range(3))
    ops.attention(q96, k96[:, :2], v96[:, :2], 0.1)
    assert len(calls) == 1


def test_decoder_forward_matches_torch_path(kernel_device, tiny_model_dir, monkeypatch) -> None:
    """A whole model (head dim 64) on the GPU: prefill, decode and a tree step through the kernels
    give the logits of the torch path."""
    if kernel_device.type != "cuda":
        pytest.skip("whole models on the emulated kernels: test_emulated_model.py")
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


@pytest.mark.parametrize("sm90", [False, True], ids=["generic", "sm90"])
def test_verified_logits_equal_decoded_logits_on_the_gpu(kernel_device, tiny_model_dir, sm90, monkeypatch) -> None:
    """Row invariance through a whole bf16 model on the GPU kernels, dense and 4-bit (emulated:
    test_emulated_model.py::test_verified_logits_equal_decoded_logits_bitwise)."""
    if kernel_device.type != "cuda":
        pytest.skip("emulated: test_emulated_model.py")
    use_attention_family(sm90, kernel_device, monkeypatch)
    from edgespec.loading import load_model
    from test_spec_helpers import assert_tree_rows_decode_alike

    path = tiny_model_dir("llama", seed=7, vocab_size=128, hidden_size=256, num_attention_heads=4,
                          num_key_value_heads=1, intermediate_size=256, num_hidden_layers=2)
    for quantized in (False, True):
        model = load_model(str(path), device="cuda", dtype=torch.bfloat16, max_context=256, with_tokenizer=False).model
        assert_tree_rows_decode_alike(model, quantized)


@pytest.mark.parametrize("sm90", [False, True], ids=["generic", "sm90"])
def test_speculative_greedy_equals_plain_on_the_gpu(kernel_device, tiny_model_dir, tmp_path, sm90, monkeypatch) -> None:
    """The speculative invariant on the GPU kernels in bf16: the row-invariant kernels give a
    verified token the bits of a decoded one, so the outputs are equal token for token. Should they
    part, the message says whether plain decoding's top two logits were within rounding there."""
    if kernel_device.type != "cuda":
        pytest.skip("emulated: test_emulated_model.py::test_speculative_greedy_equals_plain_on_the_kernels")
    use_attention_family(sm90, kernel_device, monkeypatch)
    from edgespec import LLM
    from edgespec.loading import load_model
    from test_spec_helpers import plain_and_speculative

    path = tiny_model_dir("llama", seed=3, vocab_size=40, hidden_size=128, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=256, num_hidden_layers=2)
    llm = LLM(load_model(str(path), device="cuda", dtype=torch.bfloat16, max_context=256, with_tokenizer=False))
    prompt = [1, 5, 9, 3, 17, 22, 8]
    plain, result = plain_and_speculative(llm, tmp_path / "head", prompt, 64, tree_size=32, depth=5, topk=4)
    if result.token_ids == plain:
        return
    # Not equal: a failure either way; say whether it is at a near-tie (rounding) or a real bug.
    first = next(i for i, (a, b) in enumerate(zip(result.token_ids, plain)) if a != b)
    model = llm.model
    ids = torch.tensor(prompt + plain[:first], device="cuda")
    with torch.inference_mode():
        logits = model.logits(model.forward(ids, torch.arange(ids.numel(), device="cuda"), model.new_cache(), 0).hidden)[-1]
    top = logits.float().topk(2).values
    near_tie = (top[0] - top[1]).item() <= 2e-2 * logits.float().abs().max().item()
    pytest.fail(f"speculative and plain greedy output part at token {first}, where the top two logits are "
                f"{top.tolist()}: " + ("a near-tie, so a row-invariance leak (a kernel whose result depends on "
                                       "the rows it comes with)" if near_tie else "not a near-tie: a verification bug"))
