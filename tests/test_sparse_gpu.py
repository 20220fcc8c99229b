"""InfLLM-v2 block-selection kernels against the oracle (tests/oracle/sparse_ref.py) on a GPU.

Covers: compressed keys (incremental ranges, every dtype, odd head counts and dims, untouched
rows stay poisoned), block selection compared exactly where the oracle's scores are not tied
(MiniCPM4-8B shapes and GQA 1/4/16 with scaled-down settings, poisoned outputs), the op layer
end to end, device-side lengths under CUDA graph replay, and generation over a long context in
which tokens generated more than one window ago must still be selectable.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from edgespec import ops
from edgespec.models.sparse import parse_sparse_config
from oracle import sparse_ref
from sparse_cases import MINICPM4_8B, SMALL, allowed_keys, assert_selection_matches_oracle, params, random_case, random_selection

pytestmark = pytest.mark.gpu

# Block scores closer than this may rank differently in the kernels' fp32 and the fp64 oracle.
TIE = 1e-4
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _kernels():
    from edgespec.ops import _kernels

    return _kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv, dim", [(1, 64), (2, 128), (3, 72)])
def test_compress_keys_kernel_matches_oracle(dtype, hkv, dim):
    cfg = parse_sparse_config(SMALL)
    gen = torch.Generator().manual_seed(hkv * dim)
    keys = torch.randn(1011, hkv, dim, generator=gen).to("cuda", dtype)
    ck = torch.full((70, hkv, dim), float("nan"), device="cuda", dtype=dtype)
    for a, b in [(0, 31), (0, 300), (300, 301), (301, 302), (250, 777), (777, 1011)]:
        assert _kernels().supports_compress_keys(keys, ck, cfg.kernel_size, cfg.kernel_stride)
        ops.compress_keys(keys, ck, a, b, cfg.kernel_size, cfg.kernel_stride)
    n = cfg.num_kernels(1011)
    ref = sparse_ref.compressed_keys(keys.cpu(), 1011, params(cfg)).to(dtype)
    torch.testing.assert_close(ck[:n].cpu(), ref, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-3)
    assert torch.isnan(ck[n:]).all(), "rows past the complete kernels must be left alone"


def test_compress_keys_reads_its_range_on_the_device():
    cfg = parse_sparse_config(SMALL)
    keys = torch.randn(400, 2, 64, device="cuda", dtype=torch.bfloat16)
    ck = torch.full((30, 2, 64), float("nan"), device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([0, 0], dtype=torch.int32, device="cuda")
    lengths.copy_(torch.tensor([96, 200], dtype=torch.int32))
    # The host bounds allow every kernel of the 400 tokens; the device range decides which are written.
    _kernels().compress_keys(keys, ck, 0, 400, cfg.kernel_size, cfg.kernel_stride, lengths=lengths)
    done = ~torch.isnan(ck[:, 0, 0]).cpu()
    assert done.nonzero().flatten().tolist() == list(range(cfg.num_kernels(96), cfg.num_kernels(200)))


def _check_selection(cfg, q, k, positions, kv_limit, dense_len):
    """Kernel selection vs the oracle on the same (rounded) compressed keys; returns the kernel's
    bool [T, Hkv, nB] selection and the indices of queries where it took an equivalent tie."""
    s = k.shape[0]
    nb = (s + cfg.block_size - 1) // cfg.block_size
    ck = torch.zeros(max(cfg.num_kernels(s), 1), k.shape[1], k.shape[2], device="cuda", dtype=k.dtype)
    ops.compress_keys(k, ck, 0, kv_limit, cfg.kernel_size, cfg.kernel_stride)
    pos = torch.tensor(positions, device="cuda")
    scale = q.shape[-1] ** -0.5
    assert _kernels().supports_sparse_select(q, ck, pos, cfg, nb)
    words = _kernels().sparse_select_blocks(q, ck, pos, cfg, scale, dense_len, kv_limit, nb)
    sel = ops.select_blocks(q, ck, pos, cfg, scale, dense_len, kv_limit, nb).cpu()
    tied = assert_selection_matches_oracle(sel, q, ck, positions, cfg, kv_limit, dense_len, scale, nb, TIE)
    return words, sel, tied


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 3])
def test_select_minicpm4_8b_decode_matches_oracle(dtype, t):
    cfg = parse_sparse_config(MINICPM4_8B)
    s = 16_411  # 256.4 blocks, 1024 kernels: a partial last block and pool window
    q, k, _ = random_case(32, 2, 128, s, t, dtype, seed=t, device="cuda")
    words, sel, _ = _check_selection(cfg, q, k, list(range(s - t, s)), s, cfg.dense_len)
    assert words.shape == (t, 2, (257 + 63) // 64)
    assert sel[-1].sum(dim=-1).tolist() == [1 + 32 + 64] * 2


@pytest.mark.parametrize("hq, hkv", [(2, 2), (8, 2), (16, 1)])
def test_select_chunk_crossing_dense_threshold_matches_oracle(hq, hkv):
    cfg = parse_sparse_config(SMALL)
    s = 1_131
    t = 700  # positions 431 .. 1130: below and above dense_len = 512
    q, k, _ = random_case(hq, hkv, 64, s, t, torch.bfloat16, seed=hq, device="cuda")
    _check_selection(cfg, q, k, list(range(s - t, s)), s, cfg.dense_len)


def test_select_tree_uses_the_prefix_and_writes_every_word(monkeypatch):
    cfg = parse_sparse_config(SMALL)
    prefix, t = 1_500, 9
    depth = [0, 1, 1, 2, 2, 3, 3, 4, 5]
    q, k, _ = random_case(16, 2, 128, prefix + t, t, torch.bfloat16, seed=9, device="cuda")
    positions = [prefix + d for d in depth]
    words, _, _ = _check_selection(cfg, q, k, positions, prefix, cfg.dense_len)
    # Poisoned outputs and scratch: NaN floats, all-ones words; the result must not change.
    K = _kernels()
    real = K._new_output

    def poisoned(shape, dtype, device):
        out = real(shape, dtype, device)
        return out.fill_(float("nan") if dtype.is_floating_point else -1)

    monkeypatch.setattr(K, "_new_output", poisoned)
    ck = torch.zeros(cfg.num_kernels(prefix + t), 2, 128, device="cuda", dtype=torch.bfloat16)
    ops.compress_keys(k, ck, 0, prefix, cfg.kernel_size, cfg.kernel_stride)
    again = K.sparse_select_blocks(q, ck, torch.tensor(positions, device="cuda"), cfg, 128 ** -0.5,
                                   cfg.dense_len, prefix, (prefix + t + 63) // 64)
    assert torch.equal(again, words)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [5, 40])  # selection kernels / torch GEMM scoring, then the attention kernels
def test_sparse_attention_op_on_gpu_matches_oracle(dtype, t):
    cfg = parse_sparse_config(SMALL)
    s = 900
    q, k, v = random_case(8, 2, 64, s, t, dtype, seed=5, device="cuda")
    ck = torch.zeros(cfg.num_kernels(s), 2, 64, device="cuda", dtype=dtype)
    ops.compress_keys(k, ck, 0, s, cfg.kernel_size, cfg.kernel_stride)
    positions = list(range(s - t, s))
    out = ops.sparse_attention(q, k, v, 0.125, ck, torch.tensor(positions, device="cuda"), cfg,
                               dense_len=cfg.dense_len, kv_limit=s)
    ref = sparse_ref.sparse_attention(q.cpu(), k.cpu(), v.cpu(), positions, 0.125, params(cfg), s)
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(out.cpu().double(), ref.out, rtol=tol, atol=tol)


def test_selection_under_cuda_graph_replay_follows_device_lengths():
    cfg = parse_sparse_config(SMALL)
    s_max = 1_300
    q_all, k, _ = random_case(16, 2, 128, s_max, 40, torch.bfloat16, seed=11, device="cuda")
    nb = (s_max + 63) // 64
    ck = torch.zeros(cfg.num_kernels(s_max), 2, 128, device="cuda", dtype=torch.bfloat16)
    lengths = torch.zeros(2, dtype=torch.int32, device="cuda")
    kv_limit = torch.zeros(1, dtype=torch.int32, device="cuda")
    q = torch.empty(1, 16, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")
    K = _kernels()

    def step():
        # Host bounds only size the launch (3 kernels: enough for a jump of up to 48 tokens).
        K.compress_keys(k, ck, 0, 64, cfg.kernel_size, cfg.kernel_stride, lengths=lengths)
        return K.sparse_select_blocks(q, ck, pos, cfg, 128 ** -0.5, cfg.dense_len, kv_limit, nb)

    def set_step(length, previous):
        lengths.copy_(torch.tensor([previous, length], dtype=torch.int32))
        kv_limit.fill_(length)
        pos.fill_(length - 1)
        q.copy_(q_all[length % 40:length % 40 + 1])

    set_step(1_200, 1_199)
    ops.compress_keys(k, ck, 0, 1_199, cfg.kernel_size, cfg.kernel_stride)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture (sets the kernels' shared-memory attributes)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mask = step()
    previous = 1_199
    for length in (1_200, 1_201, 1_215, 1_216, 1_263, 1_290):  # decode steps and jumps (accepted drafts)
        set_step(length, previous)
        previous = length
        graph.replay()
        eager = K.sparse_select_blocks(q, ck, pos, cfg, 128 ** -0.5, cfg.dense_len, length, nb)
        assert torch.equal(mask, eager), f"replay at length {length}"
    ref = sparse_ref.compressed_keys(k.cpu(), 1_290, params(cfg)).to(torch.bfloat16)
    torch.testing.assert_close(ck[:ref.shape[0]].cpu(), ref, rtol=1e-2, atol=1e-3)


def test_generation_keeps_old_generated_tokens_selectable(tiny_model_dir, monkeypatch):
    from edgespec.loading import load_model

    path = tiny_model_dir("llama", seed=3, num_attention_heads=8, num_key_value_heads=2, hidden_size=512,
                          max_position_embeddings=4096)
    cfg_json = json.loads((path / "config.json").read_text())
    cfg_json.update(model_type="minicpm", scale_emb=2.0, scale_depth=1.4, dim_model_base=256, sparse_config=SMALL)
    (path / "config.json").write_text(json.dumps(cfg_json))
    model = load_model(str(path), device="cuda", dtype=torch.bfloat16, max_context=2048, with_tokenizer=False).model
    calls = []
    real = ops.sparse_attention

    def spy(q, k, v, scale, ck, positions, cfg, dense_len, kv_limit, tree_mask=None):
        calls.append((q.clone(), k.clone(), ck.clone(), positions.tolist(), scale, kv_limit))
        return real(q, k, v, scale, ck, positions, cfg, dense_len=dense_len, kv_limit=kv_limit, tree_mask=tree_mask)

    monkeypatch.setattr(ops, "sparse_attention", spy)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (600,), generator=gen).cuda()
    cache = model.new_cache()
    with torch.inference_mode():
        hidden = model.forward(prompt, torch.arange(600, device="cuda"), cache, 0).hidden
        token, pos = int(model.logits(hidden[-1:]).argmax()), 600
        for _ in range(400):  # 400 generated tokens: > 3 windows of 128
            hidden = model.forward(torch.tensor([token], device="cuda"), torch.tensor([pos], device="cuda"),
                                   cache, pos).hidden
            token, pos = int(model.logits(hidden).argmax()), pos + 1
    cfg = model.config.sparse_config
    p = params(cfg)
    old_generated = range(640 // 64, (pos - cfg.window_size) // 64)
    picked = 0
    for q, k, ck, positions, scale, kv_limit in calls[-model.config.num_layers:]:
        n = cfg.num_kernels(kv_limit)
        ref_ck = sparse_ref.compressed_keys(k.cpu(), kv_limit, p).to(torch.bfloat16)
        torch.testing.assert_close(ck[:n].cpu(), ref_ck, rtol=1e-2, atol=1e-3)
        nb = (k.shape[0] + 63) // 64
        sel = ops.select_blocks(q, ck, torch.tensor(positions, device="cuda"), cfg, scale, cfg.dense_len,
                                kv_limit, nb).cpu()
        scores = sparse_ref.block_scores(q[0].cpu(), ck[:n].cpu(), scale, nb, p)
        for g in range(k.shape[1]):
            assert all(math.isfinite(scores[g][b]) for b in old_generated)
            want = sparse_ref.select(scores[g], positions[0], p)
            got = sel[0, g].nonzero().flatten().tolist()
            assert got == want or sparse_ref.equivalent_selection(got, want, scores[g], positions[0], p, TIE)
            picked += sum(b in old_generated for b in got)
    assert picked > 0, "no block of tokens generated more than a window ago was ever chosen"


def test_kernel_entry_points_reject_bad_inputs():
    from edgespec.errors import KernelError

    cfg = parse_sparse_config(SMALL)
    K = _kernels()
    q = torch.randn(2, 8, 64, device="cuda", dtype=torch.bfloat16)
    ck = torch.zeros(10, 2, 64, device="cuda", dtype=torch.bfloat16)
    pos = torch.tensor([100, 101], device="cuda")
    assert "int64" in K.sparse_select_rejection(q, ck, pos.int(), cfg, 3)
    assert "dtype" in K.sparse_select_rejection(q, ck.float(), pos, cfg, 3)
    assert "at most" in K.sparse_select_rejection(q, ck, pos, cfg, 5000)
    with pytest.raises(ValueError, match="sparse_select_blocks"):
        K.sparse_select_blocks(q, ck, pos.int(), cfg, 1.0, 0, 102, 3)
    # Past the Python checks (an unvalidated config): C++ re-checks the geometry.
    bad = SimpleNamespace(block_size=40, kernel_size=32, kernel_stride=16, init_blocks=1, window_blocks=2, topk=4)
    with pytest.raises(KernelError, match="block_size"):
        K.sparse_select_blocks(q, ck, pos, bad, 1.0, 0, 102, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq, hkv, dim, s, t, tree", [
    (32, 2, 128, 9_000, 1, False),   # MiniCPM4-8B decode
    (32, 2, 128, 5_000, 77, False),  # a prefill chunk
    (16, 4, 64, 4_099, 5, False),    # GQA 4, a partial last block
    (8, 8, 64, 3_001, 19, True),     # GQA 1, tree verification over a sparse prefix
])
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_attention_kernel_with_block_mask_matches_oracle(dtype, hq, hkv, dim, s, t, tree, splits, monkeypatch):
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(s + t)
    q, k, v = random_case(hq, hkv, dim, s, t, dtype, seed=s, device="cuda")
    prefix = s - t
    if tree:
        from test_sparse_cpu import _random_tree

        vis, depth = _random_tree(t, gen)
        positions = [prefix + d for d in depth]
        packed = ops.pack_tree_mask(vis).cuda()
    else:
        vis, positions, packed = None, list(range(prefix, s)), None
    nb = (s + 63) // 64
    blocks, words = random_selection(positions, hkv, nb, 64, gen, 0.1)
    K = _kernels()
    real = K._new_output
    monkeypatch.setattr(K, "_new_output", lambda *a: real(*a).fill_(float("nan")))
    scale = dim ** -0.5
    out = K.attention(q, k, v, scale, packed, splits=splits, block_mask=words.cuda())
    ref = sparse_ref.attend_blocks(q.cpu(), k.cpu(), v.cpu(), positions, scale, 64, blocks, vis)
    # PyTorch's own error at this precision, with the same mask, sets the tolerance.
    allowed = allowed_keys(t, hq, hkv, s, positions, blocks, vis)
    torch_out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                               attn_mask=allowed.transpose(0, 1)[None].cuda(), scale=scale,
                                               enable_gqa=hq != hkv)[0].transpose(0, 1)
    torch_err = (torch_out.double().cpu() - ref).abs().max().item()
    err = (out.double().cpu() - ref).abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * torch_err + 1e-3, f"kernel error {err} vs torch {torch_err}"


def test_op_layer_takes_the_block_sparse_attention_kernel(monkeypatch):
    cfg = parse_sparse_config(SMALL)
    K = _kernels()
    calls = []
    real = K.attention
    monkeypatch.setattr(K, "attention", lambda *a, **kw: calls.append(kw.get("block_mask")) or real(*a, **kw))
    q, k, v = random_case(16, 2, 128, 2_000, 3, torch.bfloat16, seed=2, device="cuda")
    ck = torch.zeros(cfg.num_kernels(2_000), 2, 128, device="cuda", dtype=torch.bfloat16)
    ops.compress_keys(k, ck, 0, 2_000, cfg.kernel_size, cfg.kernel_stride)
    ops.sparse_attention(q, k, v, 0.1, ck, torch.arange(1_997, 2_000, device="cuda"), cfg, dense_len=512, kv_limit=2_000)
    assert len(calls) == 1 and calls[0] is not None and calls[0].shape == (3, 2, 1)
