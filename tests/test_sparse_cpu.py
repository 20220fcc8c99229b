"""InfLLM-v2 block-sparse attention on CPU: config validation, the op layer's torch path against the
oracle (tests/oracle/sparse_ref.py), and the decoder wiring (state, switch, chunking invariance).

Settings are MiniCPM4's scaled down so contexts of a few hundred tokens cross the dense threshold:
blocks of 16 tokens, kernels of 8 with stride 4 (so the pool is kernel 5 / stride 4 / padding 1
as in MiniCPM4), a 32-token window, top-4, dense below 256 tokens.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from edgespec import ops
from edgespec.errors import ModelFormatError
from edgespec.models.config import config_from_hf
from edgespec.models.sparse import SparseAttention, SparseConfig, mode_from_env, parse_sparse_config
from edgespec.ops.sparse_attention import path_kernels
from oracle import sparse_ref

MINICPM4_8B = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
               "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192}
SMALL = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16,
         "window_size": 32, "topk": 4, "use_nope": False, "dense_len": 256}
# Block scores closer than this may rank differently in fp32 and in the fp64 oracle.
TIE = 1e-5


def small(**over) -> SparseConfig:
    return parse_sparse_config({**SMALL, **over})


def params(cfg: SparseConfig) -> sparse_ref.SparseParams:
    return sparse_ref.SparseParams(cfg.block_size, cfg.kernel_size, cfg.kernel_stride, cfg.init_blocks,
                                   cfg.window_size, cfg.topk, cfg.dense_len)


# --- config ---------------------------------------------------------------------------------------

def test_minicpm4_8b_sparse_config_is_read_in_tokens():
    cfg = parse_sparse_config(MINICPM4_8B)
    assert (cfg.block_size, cfg.kernel_size, cfg.kernel_stride) == (64, 32, 16)
    assert (cfg.window_size, cfg.window_blocks, cfg.init_blocks, cfg.topk, cfg.dense_len) == (2048, 32, 1, 64, 8192)
    assert cfg.pool_stride == 4 and cfg.max_selected_blocks == 97
    assert [cfg.num_kernels(n) for n in (0, 31, 32, 47, 48, 8192)] == [0, 0, 1, 1, 2, 511]
    assert parse_sparse_config({}) == cfg  # HF defaults are MiniCPM4-8B's
    assert parse_sparse_config(None) is None


def test_config_from_hf_parses_sparse_config():
    d = {"model_type": "minicpm", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 100, "intermediate_size": 96, "sparse_config": dict(SMALL)}
    cfg = config_from_hf(d, "m/config.json")
    assert cfg.sparse_config == small()
    d["sparse_config"] = {**SMALL, "window_size": 40}
    with pytest.raises(ModelFormatError, match=r"m/config.json: sparse_config: window_size=40 .*block_size=16"):
        config_from_hf(d, "m/config.json")


@pytest.mark.parametrize("bad, message", [
    ({"topk_blocks": 3}, "unknown key"),
    ({"use_nope": True}, "use_nope"),
    ({"window_size": 2000}, "whole number"),
    ({"block_size": 60}, "multiple of kernel_stride"),
    ({"kernel_size": 8, "kernel_stride": 16}, "shorter than kernel_stride"),
    ({"topk": -1}, "topk must be >= 0"),
    ({"block_size": 0}, "block_size must be a positive"),
    ({"dense_len": 8192.0}, "dense_len must be an integer"),
])
def test_bad_sparse_configs_are_rejected_with_the_reason(bad, message):
    with pytest.raises(ModelFormatError, match=message):
        parse_sparse_config({**MINICPM4_8B, **bad})
    with pytest.raises(ModelFormatError, match="JSON object"):
        parse_sparse_config([1, 2])


def test_mode_switch_from_env_and_setter(monkeypatch):
    monkeypatch.setenv("EDGESPEC_SPARSE", "Dense")
    assert mode_from_env() == "dense"
    monkeypatch.setenv("EDGESPEC_SPARSE", "fast")
    with pytest.raises(ValueError, match="EDGESPEC_SPARSE='fast'"):
        mode_from_env()
    monkeypatch.delenv("EDGESPEC_SPARSE")
    sa = SparseAttention(small(), 2, 2, 8)
    assert sa.mode == "auto" and sa.active(256) and not sa.active(255)
    # A tree after 250 slots crosses dense_len (256) when its last rows reach it.
    assert sa.crosses_dense_len(250, 6) and sa.crosses_dense_len(254, 9)
    assert not sa.crosses_dense_len(250, 5) and not sa.crosses_dense_len(255, 9)
    sa.mode = "sparse"
    assert sa.active(1) and not sa.crosses_dense_len(0, 9)
    sa.mode = "dense"
    assert not sa.active(10_000)
    with pytest.raises(ValueError, match="not one of"):
        sa.mode = "on"


# --- op layer vs oracle ---------------------------------------------------------------------------

def test_compress_keys_incremental_matches_oracle():
    cfg = small()
    torch.manual_seed(0)
    k = torch.randn(203, 3, 16)
    ck = torch.full((60, 3, 16), float("nan"))
    for a, b in [(0, 7), (0, 40), (40, 41), (41, 99), (99, 203)]:
        ops.compress_keys(k, ck, a, b, cfg.kernel_size, cfg.kernel_stride)
    ref = sparse_ref.compressed_keys(k, 203, params(cfg))
    n = cfg.num_kernels(203)
    assert ref.shape[0] == n == 49
    torch.testing.assert_close(ck[:n].double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.isnan(ck[n:]).all()  # nothing written past the complete kernels
    with pytest.raises(ValueError, match="do not fit"):
        ops.compress_keys(k, ck[:10], 0, 203, cfg.kernel_size, cfg.kernel_stride)
    with pytest.raises(ValueError, match="start_len"):
        ops.compress_keys(k, ck, 50, 10, cfg.kernel_size, cfg.kernel_stride)


def assert_equivalent_selection(got: list[int], want: list[int], scores: list[float], position: int,
                                p: sparse_ref.SparseParams, where: str) -> None:
    assert sparse_ref.equivalent_selection(got, want, scores, position, p, TIE), f"{where}: {got} vs oracle {want}"


def _compare(cfg: SparseConfig, q, k, v, positions, kv_limit, tree=None, dense_len=None):
    """Run the op and the oracle on the same inputs; compare selections (where not tied) and outputs."""
    s = k.shape[0]
    dense_len = cfg.dense_len if dense_len is None else dense_len
    scale = q.shape[-1] ** -0.5
    ck = torch.zeros(max(cfg.num_kernels(s), 1), k.shape[1], k.shape[2])
    ops.compress_keys(k, ck, 0, kv_limit, cfg.kernel_size, cfg.kernel_stride)
    pos = torch.tensor(positions)
    packed = ops.pack_tree_mask(tree) if tree is not None else None
    out = ops.sparse_attention(q, k, v, scale, ck, pos, cfg, dense_len=dense_len, kv_limit=kv_limit, tree_mask=packed)
    nb = (s + cfg.block_size - 1) // cfg.block_size
    path = None if tree is None else path_kernels(k, kv_limit, tree, cfg.kernel_size, cfg.kernel_stride)
    sel = ops.select_blocks(q, ck, pos, cfg, scale, dense_len, kv_limit, nb, path)
    ref = sparse_ref.sparse_attention(q, k, v, positions, scale, params(cfg), kv_limit, tree, dense_len)
    p = params(cfg)
    differ, sparse_queries = set(), 0
    for i, blocks in enumerate(ref.selected):
        if blocks is None:
            assert sel[i].all(dim=0).tolist() == [b <= positions[i] // cfg.block_size for b in range(nb)]
            continue
        sparse_queries += 1
        for g, want in enumerate(blocks):
            got = torch.nonzero(sel[i, g]).flatten().tolist()
            if got != want:
                assert_equivalent_selection(got, want, ref.scores[i][g], positions[i], p, f"query {i} head {g}")
                differ.add(i)
    assert len(differ) <= max(1, len(positions) // 20), f"{len(differ)} queries picked other near-tied blocks"
    keep = [i for i in range(len(positions)) if i not in differ]
    torch.testing.assert_close(out[keep].double(), ref.out[keep], rtol=2e-5, atol=2e-5)
    return sel, sparse_queries


@pytest.mark.parametrize("hq, hkv", [(2, 2), (8, 2), (16, 1)])
def test_prefill_crossing_dense_threshold_matches_oracle(hq, hkv):
    cfg = small()
    torch.manual_seed(hq)
    s = 301  # 18.8 blocks, 74 kernels: neither a whole number of blocks nor of pool windows
    q = torch.randn(s, hq, 16) * 2
    k, v = torch.randn(s, hkv, 16), torch.randn(s, hkv, 16)
    sel, sparse_queries = _compare(cfg, q, k, v, list(range(s)), kv_limit=s)
    assert sparse_queries == s - 255  # queries at positions 255.. have a context >= dense_len
    # Sparse queries far enough out really skip blocks: init + window + top-4 < their block count.
    assert not sel[-1].all()
    assert sel[-1].sum(dim=-1).tolist() == [1 + 2 + 4] * hkv


@pytest.mark.parametrize("hq, hkv, start, t", [(4, 4, 422, 1), (8, 2, 379, 45), (16, 1, 500, 3)])
def test_decode_and_chunks_match_oracle(hq, hkv, start, t):
    cfg = small(topk=3, init_blocks=2)
    torch.manual_seed(start)
    s = start + t
    q = torch.randn(t, hq, 16) * 2
    k, v = torch.randn(s, hkv, 16), torch.randn(s, hkv, 16)
    _compare(cfg, q, k, v, list(range(start, s)), kv_limit=s)


def _random_tree(t: int, gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """bool [T, T] ancestor-or-self visibility of a random tree (parents before children) and depths."""
    parent = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, t)]
    vis = torch.zeros(t, t, dtype=torch.bool)
    depth = []
    for i in range(t):
        j, d = i, 0
        while j != -1:
            vis[i, j] = True
            j = parent[j]
            d += 1
        depth.append(d - 1)
    return vis, depth


@pytest.mark.parametrize("hq, hkv, t", [(8, 2, 11), (16, 1, 70)])
def test_tree_verification_matches_oracle(hq, hkv, t):
    cfg = small()
    gen = torch.Generator().manual_seed(t)
    prefix = 389
    tree, depth = _random_tree(t, gen)
    q = torch.randn(t, hq, 16, generator=gen) * 2
    k, v = torch.randn(prefix + t, hkv, 16, generator=gen), torch.randn(prefix + t, hkv, 16, generator=gen)
    _compare(cfg, q, k, v, [prefix + d for d in depth], kv_limit=prefix, tree=tree)


def test_forced_sparse_and_huge_topk_equals_dense():
    cfg = small(topk=1000)
    torch.manual_seed(1)
    q, k, v = torch.randn(40, 8, 16), torch.randn(140, 2, 16), torch.randn(140, 2, 16)
    ck = torch.zeros(40, 2, 16)
    ops.compress_keys(k, ck, 0, 140, cfg.kernel_size, cfg.kernel_stride)
    pos = torch.arange(100, 140)
    out = ops.sparse_attention(q, k, v, 0.25, ck, pos, cfg, dense_len=0, kv_limit=140)
    torch.testing.assert_close(out, ops.attention(q, k, v, 0.25), rtol=1e-5, atol=1e-5)
    narrow = ops.sparse_attention(q, k, v, 0.25, ck, pos, small(topk=0), dense_len=0, kv_limit=140)
    assert (narrow - out).abs().max() > 1e-3  # with only init + window it really is different


def test_block_bits_pack_like_tree_masks():
    from edgespec.ops.sparse_attention import _pack_bits

    bits = torch.rand(3, 2, 130, generator=torch.Generator().manual_seed(0)) < 0.3
    words = _pack_bits(bits)
    assert words.shape == (3, 2, 3) and words.dtype == torch.int64
    assert torch.equal(ops.unpack_tree_mask(words.view(6, 3), 130).view(3, 2, 130), bits)


def test_sparse_attention_rejects_bad_inputs():
    cfg = small()
    q, k = torch.randn(2, 4, 16), torch.randn(100, 2, 16)
    ck = torch.zeros(30, 2, 16)
    pos = torch.tensor([98, 99])
    with pytest.raises(ValueError, match="compressed keys must be"):
        ops.sparse_attention(q, k, k, 1.0, torch.zeros(30, 1, 16), pos, cfg, 0, 100)
    with pytest.raises(ValueError, match="positions must be int"):
        ops.sparse_attention(q, k, k, 1.0, ck, pos.float(), cfg, 0, 100)
    with pytest.raises(ValueError, match="cannot cover kv_limit"):
        ops.sparse_attention(q, k, k, 1.0, ck[:3], pos, cfg, 0, 100)
    with pytest.raises(ValueError, match="tree mask must be"):
        ops.sparse_attention(q, k, k, 1.0, ck, pos, cfg, 0, 98, tree_mask=torch.zeros(2, 2, dtype=torch.int64))
    # A decoded token and a tree's tokens sit at their logical positions (the prefix, then depths).
    with pytest.raises(ValueError, match="not the slots' logical positions"):
        ops.sparse_attention(q[:1], k, k, 1.0, ck, torch.tensor([97]), cfg, 0, 100)
    chain = ops.pack_tree_mask(torch.ones(2, 2, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="not the slots' logical positions"):
        ops.sparse_attention(q, k, k, 1.0, ck, torch.tensor([98, 98]), cfg, 0, 98, tree_mask=chain)
    with pytest.raises(ValueError, match="kv_limit must be its committed prefix 98"):
        ops.sparse_attention(q, k, k, 1.0, ck, pos, cfg, 0, 97, tree_mask=chain)


def test_device_side_lengths_give_the_host_results():
    """What a CUDA graph step passes: compressed-key lengths, kv_limit and seqlen as int32 tensors,
    over a longer view of the cache (NaN past the real length). The torch path gives the host
    ints' bits (the block scores mask past kv_limit on the device)."""
    cfg = small(dense_len=64)
    torch.manual_seed(4)
    k, v = torch.randn(300, 2, 16), torch.randn(300, 2, 16)
    ck_host, ck_dev = torch.zeros(80, 2, 16), torch.zeros(80, 2, 16)
    ops.compress_keys(k, ck_host, 0, 200, cfg.kernel_size, cfg.kernel_stride)
    ops.compress_keys(k, ck_dev, 0, 120, cfg.kernel_size, cfg.kernel_stride,
                      lengths=torch.tensor([0, 200], dtype=torch.int32))
    assert torch.equal(ck_host, ck_dev)
    q = torch.randn(5, 8, 16)
    positions = torch.arange(195, 200)
    scale = 0.25
    host_scores = ops.block_scores(q, ck_host, positions, cfg, scale, 180, 13)
    dev_scores = ops.block_scores(q, ck_host, positions, cfg, scale, torch.tensor([180], dtype=torch.int32), 13)
    assert torch.equal(host_scores, dev_scores) and torch.isinf(host_scores[..., 12]).all()
    view_k, view_v = torch.full((300, 2, 16), float("nan")), torch.full((300, 2, 16), float("nan"))
    view_k[:200], view_v[:200] = k[:200], v[:200]
    for tree in (None, ops.pack_tree_mask(torch.ones(5, 5, dtype=torch.bool).tril())):
        limit = 195 if tree is not None else 200
        want = ops.sparse_attention(q, k[:200], v[:200], scale, ck_host, positions, cfg, 64, limit, tree)
        got = ops.sparse_attention(q, view_k, view_v, scale, ck_host, positions, cfg, 64,
                                   torch.tensor([limit], dtype=torch.int32), tree,
                                   seqlen=torch.tensor([200], dtype=torch.int32))
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"lengths must be int32 \[2\] on cpu, got torch.int64"):
        ops.compress_keys(k, ck_dev, 0, 120, cfg.kernel_size, cfg.kernel_stride, lengths=torch.tensor([0, 200]))
    with pytest.raises(ValueError, match=r"a device-side kv_limit must be int32 \[1\]"):
        ops.sparse_attention(q, view_k, view_v, scale, ck_host, positions, cfg, 64, torch.tensor([200, 1]))
    with pytest.raises(ValueError, match="seqlen 4 must hold the 5 new tokens"):
        ops.sparse_attention(q, view_k, view_v, scale, ck_host, positions, cfg, 64, 200,
                             seqlen=torch.tensor([4], dtype=torch.int32))


# --- decoder wiring -------------------------------------------------------------------------------

def _minicpm_sparse_dir(tiny_model_dir, **sparse_over):
    path = tiny_model_dir("llama", seed=3, num_attention_heads=8, num_key_value_heads=2, hidden_size=128,
                          max_position_embeddings=2048)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="minicpm", scale_emb=2.0, scale_depth=1.4, dim_model_base=64,
               sparse_config={**SMALL, **sparse_over})
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _load(path, dtype=torch.float32):
    from edgespec.loading import load_model

    return load_model(str(path), device="cpu", dtype=dtype, max_context=1024, with_tokenizer=False).model


def _run(model, tokens, chunks, cache=None):
    """Feed tokens through model in the given chunk sizes; returns hidden [N, H] and the cache."""
    cache = cache or model.new_cache()
    outs, s = [], 0
    for n in chunks:
        part = tokens[s:s + n]
        outs.append(model.forward(part, torch.arange(s, s + n), cache, s).hidden)
        s += n
    cache.length = s
    return torch.cat(outs), cache


class _Spy:
    """Records the inputs and outputs of every ops.sparse_attention call the decoder makes."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = ops.sparse_attention

        def spy(q, k, v, scale, ck, positions, cfg, dense_len, kv_limit, tree_mask=None, **invariance):
            out = real(q, k, v, scale, ck, positions, cfg, dense_len=dense_len, kv_limit=kv_limit, tree_mask=tree_mask,
                       **invariance)
            self.calls.append(dict(q=q.clone(), k=k.clone(), v=v.clone(), ck=ck.clone(), positions=positions.tolist(),
                                   scale=scale, dense_len=dense_len, kv_limit=kv_limit, tree_mask=tree_mask, out=out))
            return out

        monkeypatch.setattr(ops, "sparse_attention", spy)


def test_chunked_prefill_and_decode_equal_one_shot_prefill(tiny_model_dir):
    model = _load(_minicpm_sparse_dir(tiny_model_dir))
    assert model.sparse is not None and model.sparse.mode == "auto"
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (420,))
    whole, _ = _run(model, tokens, [420])
    chunked, _ = _run(model, tokens, [97, 150, 140] + [1] * 33)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    model.sparse.mode = "dense"
    dense, _ = _run(model, tokens, [420])
    torch.testing.assert_close(dense[:255], whole[:255])   # below dense_len nothing changes
    assert (dense[300:] - whole[300:]).abs().max() > 1e-3  # above it the sparse path really runs


def test_decoder_state_and_outputs_match_oracle_across_steps(tiny_model_dir, monkeypatch):
    model = _load(_minicpm_sparse_dir(tiny_model_dir))
    spy = _Spy(monkeypatch)
    torch.manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (330,))
    _, cache = _run(model, tokens, [200, 100, 27, 1, 1, 1])
    # Every layer's call in the last four forwards: the chunk of 27 and three decode steps.
    checked = 0
    for call in spy.calls[-4 * model.config.num_layers:]:
        s = call["k"].shape[0]
        p = params(model.config.sparse_config)
        n = model.config.sparse_config.num_kernels(call["kv_limit"])
        ref_ck = sparse_ref.compressed_keys(call["k"], call["kv_limit"], p)
        torch.testing.assert_close(call["ck"][:n].double(), ref_ck, rtol=1e-5, atol=1e-5)
        ref = sparse_ref.sparse_attention(call["q"], call["k"], call["v"], call["positions"], call["scale"], p,
                                          call["kv_limit"], None, call["dense_len"])
        assert call["kv_limit"] == s and call["positions"][-1] == s - 1
        torch.testing.assert_close(call["out"].double(), ref.out, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked == 4 * model.config.num_layers


def test_rejected_and_reused_slots_are_recompressed(tiny_model_dir, monkeypatch):
    model = _load(_minicpm_sparse_dir(tiny_model_dir, dense_len=64))
    torch.manual_seed(2)
    tokens = torch.randint(0, model.config.vocab_size, (400,))
    _, cache = _run(model, tokens, [300, 20])          # 20 speculative tokens at 300 ...
    other = torch.randint(0, model.config.vocab_size, (5,))
    model.forward(other, torch.arange(305, 310), cache, 305)  # ... of which 5 were kept, then 5 new ones
    state = model.sparse.state(cache)
    p = params(model.config.sparse_config)
    n = model.config.sparse_config.num_kernels(310)
    for layer in range(model.config.num_layers):
        assert state.valid[layer] == 310
        ref = sparse_ref.compressed_keys(cache.k[layer], 310, p)
        torch.testing.assert_close(state.ck[layer, :n].double(), ref, rtol=1e-5, atol=1e-5)
    # A new, short generation in the same cache stays dense, then crosses dense_len again.
    _run(model, torch.flip(tokens, [0])[:50], [50], cache=cache)
    model.forward(tokens[:40], torch.arange(50, 90), cache, 50)
    for layer in range(model.config.num_layers):
        ref = sparse_ref.compressed_keys(cache.k[layer], 90, p)
        torch.testing.assert_close(state.ck[layer, :ref.shape[0]].double(), ref, rtol=1e-5, atol=1e-5)


def test_generated_tokens_older_than_the_window_stay_selectable(tiny_model_dir, monkeypatch):
    model = _load(_minicpm_sparse_dir(tiny_model_dir, dense_len=128))
    spy = _Spy(monkeypatch)
    torch.manual_seed(4)
    prompt = torch.randint(0, model.config.vocab_size, (150,))
    cache = model.new_cache()
    hidden = model.forward(prompt, torch.arange(150), cache, 0).hidden
    token, pos = int(model.logits(hidden[-1:]).argmax()), 150
    for _ in range(130):  # 130 generated tokens: 8 blocks, 4 windows
        hidden = model.forward(torch.tensor([token]), torch.tensor([pos]), cache, pos).hidden
        token, pos = int(model.logits(hidden).argmax()), pos + 1
    cfg = model.config.sparse_config
    p = params(cfg)
    old_generated = range(160 // cfg.block_size, (pos - cfg.window_size) // cfg.block_size)
    picked_old = 0
    for call in spy.calls[-model.config.num_layers:]:  # the last decode step, every layer
        ref = sparse_ref.sparse_attention(call["q"], call["k"], call["v"], call["positions"], call["scale"], p,
                                          call["kv_limit"], None, call["dense_len"])
        n = cfg.num_kernels(pos)
        torch.testing.assert_close(call["ck"][:n].double(), sparse_ref.compressed_keys(call["k"], pos, p),
                                   rtol=1e-5, atol=1e-5)
        nb = (pos + cfg.block_size - 1) // cfg.block_size
        sel = ops.select_blocks(call["q"], call["ck"], torch.tensor(call["positions"]), cfg, call["scale"],
                                call["dense_len"], call["kv_limit"], nb)
        for g, want in enumerate(ref.selected[0]):
            assert all(math.isfinite(ref.scores[0][g][b]) for b in old_generated)
            got = torch.nonzero(sel[0, g]).flatten().tolist()
            if got != want:
                assert_equivalent_selection(got, want, ref.scores[0][g], pos - 1, p, f"head {g}")
            picked_old += sum(b in old_generated for b in want)
        torch.testing.assert_close(call["out"].double(), ref.out, rtol=1e-4, atol=1e-4)
    assert picked_old > 0  # some block of generated tokens from more than a window ago was chosen


def test_tree_verification_in_the_decoder_matches_the_oracle(tiny_model_dir, monkeypatch):
    model = _load(_minicpm_sparse_dir(tiny_model_dir))
    torch.manual_seed(5)
    tokens = torch.randint(0, model.config.vocab_size, (300,))
    _, cache = _run(model, tokens, [300])
    spy = _Spy(monkeypatch)
    tree, depth = _random_tree(9, torch.Generator().manual_seed(9))
    tree_tokens = torch.randint(0, model.config.vocab_size, (9,))
    positions = torch.tensor([300 + d for d in depth])
    model.forward(tree_tokens, positions, cache, 300, tree_mask=ops.pack_tree_mask(tree))
    state = model.sparse.state(cache)
    assert state.valid == [300] * model.config.num_layers  # tree tokens are not compressed
    p = params(model.config.sparse_config)
    for call in spy.calls:
        assert call["kv_limit"] == 300 and call["positions"] == positions.tolist()
        ref = sparse_ref.sparse_attention(call["q"], call["k"], call["v"], call["positions"], call["scale"], p,
                                          300, tree, call["dense_len"])
        torch.testing.assert_close(call["out"].double(), ref.out, rtol=1e-4, atol=1e-4)


def test_path_kernels_are_the_decoded_paths_compressed_keys():
    """Each tree token's own kernels are bitwise the compressed keys that the cache's compression
    gives its decoded path (prefix, ancestors by depth, itself), for every kernel its context completes."""
    cfg = small()
    gen = torch.Generator().manual_seed(3)
    for prefix, t in ((389, 70), (400, 9), (5, 30)):
        tree, depth = _random_tree(t, gen)
        k = torch.randn(prefix + t, 2, 16, generator=gen).to(torch.bfloat16)
        path = path_kernels(k, prefix, tree, cfg.kernel_size, cfg.kernel_stride)
        first = cfg.num_kernels(prefix)
        checked = 0
        for i in range(t):
            order = sorted((j for j in range(t) if tree[i, j]), key=lambda j: depth[j])
            seq = torch.cat([k[:prefix], k[prefix + torch.tensor(order)]])
            ck = torch.zeros(cfg.num_kernels(seq.shape[0]) + 1, 2, 16, dtype=torch.bfloat16)
            ops.compress_keys(seq, ck, 0, seq.shape[0], cfg.kernel_size, cfg.kernel_stride)
            own = cfg.num_kernels(seq.shape[0]) - first
            assert torch.equal(path[i, :own], ck[first:first + own]), f"tree token {i}"
            checked += own
        assert checked > 0  # some tokens complete kernels of their own


@pytest.mark.parametrize("prompt_len, sparse_over", [
    (187, {"dense_len": 64}),   # a tree across a block and kernel boundaries, its ancestors outside a one-block window
    (250, {"dense_len": 256}),  # a tree across dense_len: its first rows decode dense
])
def test_verified_tree_rows_equal_decoded_rows_bitwise(tiny_model_dir, prompt_len, sparse_over):
    """bf16: every verified tree node's logits are bitwise its decoded logits (the sparse path's
    selection and attention run per position on the CPU)."""
    from test_spec_helpers import assert_tree_rows_decode_alike

    path = _minicpm_sparse_dir(tiny_model_dir, window_size=64, topk=1, **sparse_over)
    model = _load(path, torch.bfloat16)
    assert_tree_rows_decode_alike(model, prompt_len=prompt_len)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_speculative_greedy_equals_plain_on_a_sparse_model(tiny_model_dir, dtype):
    """The model as its own draft, sparse from the start and across dense_len mid-generation, with a
    one-block window and top-1 (every selection matters): the speculative output is the plain one."""
    from edgespec.spec import disable_speculation, enable_speculation
    from test_spec_helpers import tiny_llm

    path = _minicpm_sparse_dir(tiny_model_dir, window_size=64, topk=1, dense_len=240)
    llm = tiny_llm(path, max_context=1024, dtype=dtype)
    gen = torch.Generator().manual_seed(7)
    for prompt_len in (400, 200):
        prompt = torch.randint(0, llm.model.config.vocab_size, (prompt_len,), generator=gen).tolist()
        disable_speculation(llm)
        plain = llm.generate(prompt, max_new_tokens=70, ignore_eos=True).token_ids
        enable_speculation(llm, draft=str(path), tree_size=12, depth=6, topk=2)
        spec = llm.generate(prompt, max_new_tokens=70, ignore_eos=True)
        assert spec.token_ids == plain, f"prompt of {prompt_len} tokens: speculative != plain"
        hist = {int(k): v for k, v in spec.stats.extra["acceptance_histogram"].items()}
        assert max(hist) >= 3  # whole paths were verified and kept


def test_dense_mode_equals_a_model_without_sparse_config(tiny_model_dir):
    sparse_model = _load(_minicpm_sparse_dir(tiny_model_dir))
    sparse_model.sparse.mode = "dense"
    plain = _load(_minicpm_sparse_dir(tiny_model_dir))
    plain.sparse = None
    tokens = torch.randint(0, plain.config.vocab_size, (300,), generator=torch.Generator().manual_seed(6))
    a, _ = _run(sparse_model, tokens, [300])
    b, _ = _run(plain, tokens, [300])
    assert torch.equal(a, b)
    assert dataclasses.asdict(sparse_model.config.sparse_config)["dense_len"] == 256


def test_cli_sparse_option_sets_the_mode():
    from types import SimpleNamespace

    from edgespec.cli import build_parser
    from edgespec.cli.sparse_options import setup_sparse

    args = build_parser().parse_args(["generate", "--model", "demo", "--sparse", "dense", "hello"])
    assert args.sparse == "dense"
    llm = SimpleNamespace(name="m", model=SimpleNamespace(sparse=SparseAttention(small(), 2, 2, 8, mode="auto")))
    setup_sparse(llm, args)
    assert llm.model.sparse.mode == "dense"
    dense_only = SimpleNamespace(name="plain", model=SimpleNamespace(sparse=None))
    setup_sparse(dense_only, args)  # forcing dense on a dense model is a no-op
    with pytest.raises(ValueError, match="plain has no sparse_config"):
        setup_sparse(dense_only, SimpleNamespace(sparse="sparse"))
