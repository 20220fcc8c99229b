"""InfLLM-v2 settings and random inputs shared by the sparse tests: the kernel tests on the CPU
emulator and a GPU (test_sparse_kernels.py) and the whole-model emulated tests."""
from __future__ import annotations

import torch

from oracle import sparse_ref

MINICPM4_8B = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
               "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192}
# MiniCPM4's geometry scaled down: a 2-block window, top-4, dense below 512 tokens.
SMALL = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
         "window_size": 128, "topk": 4, "use_nope": False, "dense_len": 512}


def params(cfg) -> sparse_ref.SparseParams:
    """The oracle's parameters of a parsed sparse config (edgespec.models.sparse)."""
    return sparse_ref.SparseParams(cfg.block_size, cfg.kernel_size, cfg.kernel_stride, cfg.init_blocks,
                                   cfg.window_size, cfg.topk, cfg.dense_len)


def random_case(hq: int, hkv: int, dim: int, s: int, t: int, dtype: torch.dtype, seed: int,
                device: str | torch.device):
    """q [T, Hq, D] (scaled by 2, for peaked scores), k, v [S, Hkv, D]."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(t, hq, dim, generator=gen) * 2).to(device, dtype)
    k = torch.randn(s, hkv, dim, generator=gen).to(device, dtype)
    v = torch.randn(s, hkv, dim, generator=gen).to(device, dtype)
    return q, k, v


def pack_blocks(blocks: list[list[list[int]]], words: int) -> torch.Tensor:
    """blocks[i][g] lists the selected blocks of token i, KV head g -> int64 [T, Hkv, words] with
    bit b % 64 of word b // 64 set for each selected block b."""
    bits = torch.zeros(len(blocks), len(blocks[0]), 64 * words, dtype=torch.int64)
    for i, rows in enumerate(blocks):
        for g, chosen in enumerate(rows):
            bits[i, g, chosen] = 1
    shifts = torch.arange(64, dtype=torch.int64)
    return (bits.view(len(blocks), len(blocks[0]), words, 64) << shifts).sum(dim=-1)


def random_selection(positions, hkv: int, num_blocks: int, block: int, gen: torch.Generator, fraction: float):
    """Per (token, KV head): block 0, the token's own block and a random `fraction` of the blocks
    before it. Returns (the block lists, their packed mask)."""
    out = []
    for pos in positions:
        own = pos // block
        rows = []
        for _ in range(hkv):
            picks = (torch.rand(own, generator=gen) < fraction).nonzero().flatten().tolist()
            rows.append(sorted({0, own, *picks}))
        out.append(rows)
    return out, pack_blocks(out, (num_blocks + 63) // 64)


def allowed_keys(t: int, hq: int, hkv: int, s: int, positions, blocks, vis: torch.Tensor | None) -> torch.Tensor:
    """bool [T, Hq, S]: the keys each (token, query head) may attend under a block selection
    (`blocks[i][g]`, 64-token blocks) and the causal (vis None) or tree (vis [T, T]) mask of the
    last T slots: the mask that gives torch SDPA the same attention as the block-sparse kernel."""
    prefix = s - t
    allowed = torch.zeros(t, hq, s, dtype=torch.bool)
    for i in range(t):
        for h in range(hq):
            for b in blocks[i][h // (hq // hkv)]:
                allowed[i, h, b * 64:(b + 1) * 64] = True
        if vis is None:
            allowed[i, :, positions[i] + 1:] = False
        else:
            allowed[i, :, prefix:] = vis[i]
    return allowed


def assert_selection_matches_oracle(selected: torch.Tensor, q: torch.Tensor, ck: torch.Tensor, positions, cfg,
                                    kv_limit: int, dense_len: int, scale: float, num_blocks: int,
                                    tie: float) -> set[int]:
    """A block selection (bool [T, Hkv, >= num_blocks], any device) against the oracle on the
    same compressed keys: causal-dense rows below dense_len, the oracle's top-k otherwise, where a
    different but equally scored choice (within `tie`) counts as a tie. At most a tenth of the
    queries may tie. Returns the queries that did."""
    selected, q, ck = selected.cpu(), q.cpu(), ck.cpu()
    hkv = selected.shape[1]
    p = sparse_ref.SparseParams(cfg.block_size, cfg.kernel_size, cfg.kernel_stride, cfg.init_blocks,
                                cfg.window_size, cfg.topk, dense_len)
    tied = set()
    for i, position in enumerate(positions):
        q_blk = position // cfg.block_size
        if position + 1 < dense_len:
            assert selected[i, :, :num_blocks].tolist() == [[b <= q_blk for b in range(num_blocks)]] * hkv, \
                f"dense query {i}"
            continue
        visible = cfg.num_kernels(min(position + 1, kv_limit))
        scores = sparse_ref.block_scores(q[i], ck[:visible], scale, num_blocks, p)
        for g in range(hkv):
            want = sparse_ref.select(scores[g], position, p)
            got = selected[i, g].nonzero().flatten().tolist()
            if got != want:
                assert sparse_ref.equivalent_selection(got, want, scores[g], position, p, tie), \
                    f"query {i} (position {position}) KV head {g}: {got} vs oracle {want}"
                tied.add(i)
    assert len(tied) <= max(1, len(positions) // 10), f"too many tied queries: {sorted(tied)}"
    return tied
