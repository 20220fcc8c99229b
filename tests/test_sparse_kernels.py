"""InfLLM-v2 block-sparse kernels against the oracle (tests/oracle/sparse_ref.py).

One body per check for both targets (the `kernel_device` fixture, or `device_cases` where the
sizes differ): the CPU emulator (`emulated`: CPU tensors standing in for cuda:0 with 132 SMs) and
a GPU (`gpu`, skipped without one), outputs poisoned with NaN / -7 on both.

Covers: compressed keys (incremental and overlapping ranges, lengths not divisible by the stride,
odd geometries, every dtype, strided keys, more kernels than launch blocks, rows past the complete
kernels left alone, the device-side range); block scores + selection compared exactly where the
oracle's scores are not tied (GQA 1, 2, 4, 16, 32, 64; head dims 40 to 256; strided q and k;
block counts not divisible by the pool; init blocks, window, top-k, dense_len, no visible kernel,
multi-word masks, one and several score splits, device-side kv_limit and lengths over decode
steps, trees scoring only their prefix, the MiniCPM4-8B decode shape, other scratch contents);
the attention kernel's block-mask path against the oracle (decode, prefill chunk, GQA 1/2/4/16,
all five kernel instances (tile shape x tree), head dims 64 and 128, bf16 and fp16, planned / 1 /
7 splits, strided views, mask bits the kernel must ignore, a token that selects nothing); the op
layer end to end on the kernels, and its torch fallback past the score kernels' shared memory;
thread-order independence (emulator: CUEMU_SCHEDULE forward / reverse / random / serial /
serial-reverse, bit-identical); the rejections. GPU only: device-side lengths under CUDA graph
replay, the op layer's kernel dispatch, and generation over a long context in which tokens
generated more than one window ago must still be selectable.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from edgespec import ops
from edgespec.models.sparse import parse_sparse_config
from oracle import sparse_ref
from kernel_checks import device_cases, use_attention_family
from sparse_cases import MINICPM4_8B, SMALL, allowed_keys, assert_selection_matches_oracle, pack_blocks, params, random_case, random_selection

# Blocks of 16 tokens (the selection kernels take any block_size % kernel_stride == 0): many blocks,
# and masks of several words, in a short context.
FINE = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16,
        "window_size": 32, "topk": 4, "use_nope": False, "dense_len": 256}
# Block scores closer than this may rank differently in the kernels' fp32 and the fp64 oracle (the
# emulated kernels' scores are within ~1e-7 of it; a GPU's fused multiply-adds round differently).
TIE = 1e-4
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The emulator runs on one host thread; the oracles' many tiny torch ops run far faster
    without intra-op threads (on a loaded 2-core machine, up to 100x). Harmless on a GPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _K():
    from edgespec.ops import _kernels

    return _kernels


def _unpack(words: torch.Tensor) -> torch.Tensor:
    """int64 [..., W] -> bool [..., 64 W] (bit n % 64 of word n // 64)."""
    shifts = torch.arange(64, dtype=torch.int64)
    return ((words.cpu().unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)


# --- compressed keys -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv, dim, kernel_size, kernel_stride", [
    (1, 64, 32, 16),   # MiniCPM4's geometry
    (3, 72, 8, 4),     # odd heads and dim
    (2, 128, 7, 3),    # kernels and stride that divide nothing
])
def test_compress_keys_matches_oracle(kernel_device, dtype, hkv, dim, kernel_size, kernel_stride):
    gen = torch.Generator().manual_seed(hkv * dim + kernel_size)
    s = 411
    keys = torch.randn(s, hkv, dim, generator=gen).to(kernel_device, dtype)
    p = sparse_ref.SparseParams(64, kernel_size, kernel_stride, 0, 64, 0, 0)
    n_max = sparse_ref.kernel_count(s, p)
    ck = torch.full((n_max + 9, hkv, dim), float("nan"), dtype=dtype, device=kernel_device)
    # Growing ranges, one-token steps, an overlapping recompute, lengths off the stride grid.
    for a, b in [(0, 6), (0, 31), (31, 100), (100, 101), (101, 102), (90, 233), (233, 250), (250, s)]:
        assert _K().supports_compress_keys(keys, ck, kernel_size, kernel_stride)
        _K().compress_keys(keys, ck, a, b, kernel_size, kernel_stride)
        n = sparse_ref.kernel_count(b, p)
        assert not torch.isnan(ck[:n]).any(), f"after range ({a}, {b}): a kernel complete in [0, {b}) was not written"
        assert torch.isnan(ck[n:]).all(), f"after range ({a}, {b}): rows past {n} complete kernels must be left alone"
    ref = sparse_ref.compressed_keys(keys.cpu(), s, p)
    # fp32 sum and one rounding: at most the storage dtype's half ulp off the fp64 mean, plus fp32 noise.
    rtol = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(ck[:n_max].cpu().double(), ref, rtol=rtol, atol=1e-6)


def test_compress_keys_strided_keys_and_more_kernels_than_blocks(kernel_device):
    # Keys read through a view of an interleaved [S, 2, Hkv, D] cache (row stride 2 Hkv D), and a
    # range of 4198 kernels: more than the 4096 blocks a launch has, so blocks stride over kernels.
    gen = torch.Generator().manual_seed(3)
    s, p = 4_200, sparse_ref.SparseParams(64, 3, 1, 0, 64, 0, 0)
    cache = torch.randn(s, 2, 1, 8, generator=gen).to(kernel_device)
    keys = cache[:, 0]
    ck = torch.full((s, 1, 8), float("nan"), device=kernel_device)
    _K().compress_keys(keys, ck, 0, 37, 3, 1)
    _K().compress_keys(keys, ck, 37, s, 3, 1)
    n = sparse_ref.kernel_count(s, p)
    torch.testing.assert_close(ck[:n].cpu().double(), sparse_ref.compressed_keys(keys.cpu(), s, p), rtol=1e-6,
                               atol=1e-6)
    assert torch.isnan(ck[n:]).all()


def test_compress_keys_reads_its_range_on_the_device(kernel_device):
    cfg = parse_sparse_config(SMALL)
    keys = torch.randn(400, 2, 64, generator=torch.Generator().manual_seed(1)).to(kernel_device, torch.bfloat16)
    ck = torch.full((30, 2, 64), float("nan"), dtype=torch.bfloat16, device=kernel_device)
    lengths = torch.tensor([96, 200], dtype=torch.int32, device=kernel_device)
    # The host bounds allow every kernel of the 400 tokens; the device range decides which are written.
    _K().compress_keys(keys, ck, 0, 400, cfg.kernel_size, cfg.kernel_stride, lengths=lengths)
    done = ~torch.isnan(ck[:, 0, 0])
    assert done.nonzero().flatten().tolist() == list(range(cfg.num_kernels(96), cfg.num_kernels(200)))
    assert not torch.isnan(ck[done]).any()


# --- block scores and selection ------------------------------------------------------------------

def _compressed(cfg, k, length):
    ck = torch.zeros(max(cfg.num_kernels(k.shape[0]), 1), k.shape[1], k.shape[2], dtype=k.dtype, device=k.device)
    _K().compress_keys(k, ck, 0, length, cfg.kernel_size, cfg.kernel_stride)
    return ck


def _check_selection(cfg, q, k, positions, kv_limit, dense_len, ck=None, sm90=False):
    """Kernel selection (sm90: scored on the Hopper kernels) vs the oracle on the same (rounded)
    compressed keys. Returns the words int64 [T, Hkv, W] and the queries where the kernel took an
    equivalent tie."""
    s, hkv = k.shape[0], k.shape[1]
    nb = (s + cfg.block_size - 1) // cfg.block_size
    ck = _compressed(cfg, k, kv_limit) if ck is None else ck
    pos = torch.tensor(positions, device=q.device)
    scale = q.shape[-1] ** -0.5
    assert _K().supports_sparse_select(q, ck, pos, cfg, nb)
    words = _K().sparse_select_blocks(q, ck, pos, cfg, scale, dense_len, kv_limit, nb, sm90=sm90)
    assert words.shape == (len(positions), hkv, (nb + 63) // 64)
    bits = _unpack(words)
    assert not bits[..., nb:].any(), "bits past the last block must be 0"
    tied = assert_selection_matches_oracle(bits, q, ck, positions, cfg, kv_limit, dense_len, scale, nb, TIE)
    return words, tied


def _positions(lo, hi, n, must, seed):
    gen = torch.Generator().manual_seed(seed)
    picks = (lo + torch.randperm(hi - lo, generator=gen)[:n]).tolist()
    return sorted(set(picks) | set(must))


@pytest.mark.parametrize("hq, hkv", [(2, 2), (8, 2), (16, 1)])
def test_select_chunk_crossing_dense_threshold_matches_oracle(kernel_device, hq, hkv):
    cfg = parse_sparse_config(SMALL)
    s = 1_131  # 17.7 blocks, 69 kernels: a partial last block and a partial pool window
    positions = _positions(431, s, 24, [431, 510, 511, 512, 575, 576, 639, 640, s - 1], seed=hq)
    q, k, _ = random_case(hq, hkv, 64, s, len(positions), torch.bfloat16, seed=hq, device=kernel_device)
    _check_selection(cfg, q, k, positions, s, cfg.dense_len)


def _prefill_chunk_case(hq, hkv, dim, t, device, monkeypatch):
    """A chain of t queries past 600 over 1500 slots, its compressed keys, and a list that collects
    every scratch tensor the kernels' wrapper allocates (partials, scores)."""
    cfg = parse_sparse_config(SMALL)
    s = 1_500
    positions = _positions(600, s - 1, t - 1, [s - 1], seed=t)
    q, k, _ = random_case(hq, hkv, dim, s, len(positions), torch.bfloat16, seed=hq + t, device=device)
    ck = _compressed(cfg, k, s)
    captured = []
    real_new = _K()._new_output
    monkeypatch.setattr(_K(), "_new_output", lambda shape, dtype, dev: captured.append(real_new(shape, dtype, dev))
                        or captured[-1])
    return cfg, q, k, ck, positions, s, captured


@pytest.mark.parametrize("hq, hkv, dim, t", [(32, 2, 128, 40), (4, 2, 64, 70), (8, 1, 128, 17), (2, 1, 64, 33)])
def test_select_prefill_chunks_score_on_tensor_cores(kernel_device, monkeypatch, hq, hkv, dim, t):
    """Chains of 16-bit queries with head dim 64 or 128 and G dividing 16 (MiniCPM4-8B: G 16, head
    dim 128) score on the tensor-core kernels: their selections match the oracle up to ties, and
    their row statistics are the SIMT kernels' in base 2 (which also shows that they ran)."""
    cfg, q, k, ck, positions, s, captured = _prefill_chunk_case(hq, hkv, dim, t, kernel_device, monkeypatch)
    K = _K()
    assert K.sparse_scores_mma(q, ck) and K.sparse_scores_mma(q[:1], ck) and not K.sparse_scores_mma(q.float(), ck)

    def row_max() -> torch.Tensor:  # the largest scaled logit of each (token, head), from the partials
        partial = next(x for x in captured if x.dim() == 4)
        return partial[..., 0].amax(dim=0)

    _check_selection(cfg, q, k, positions, s, 0, ck=ck)
    mma_max = row_max()
    captured.clear()
    pos = torch.tensor(positions, device=kernel_device)
    K.sparse_select_blocks(q, ck, pos, cfg, dim ** -0.5, 0, s, -(-s // 64), per_split=32)  # not a 64-multiple: SIMT
    torch.testing.assert_close(mma_max, row_max() * math.log2(math.e), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hq, hkv, dim, t", [(32, 2, 128, 40), (4, 2, 64, 70), (8, 1, 128, 17), (2, 1, 64, 33)])
def test_select_prefill_chunks_score_on_the_sm90_kernels(kernel_device, monkeypatch, hq, hkv, dim, t):
    """The Hopper score kernels (S = Q.CK^T on wgmma): selections match the oracle up to ties, and
    the summed probabilities are the mma.sync kernels' up to the order of fp32 sums. Skipped on a
    GPU that is not compute capability 9.0."""
    cfg, q, k, ck, positions, s, captured = _prefill_chunk_case(hq, hkv, dim, t, kernel_device, monkeypatch)
    if _K().sparse_scores_sm90_rejection(q, ck) is not None:
        pytest.skip(_K().sparse_scores_sm90_rejection(q, ck))

    def scores() -> torch.Tensor:  # the probabilities summed over each group, [T, Hkv, columns]
        return next(x for x in captured if x.dim() == 3 and x.dtype == torch.float32).clone()

    _check_selection(cfg, q, k, positions, s, 0, ck=ck, sm90=True)
    sm90_scores = scores()
    captured.clear()
    _check_selection(cfg, q, k, positions, s, 0, ck=ck)
    mma_scores = scores()
    assert torch.isfinite(sm90_scores).any() and sm90_scores.isneginf().any()  # visible and masked kernels
    torch.testing.assert_close(sm90_scores, mma_scores, rtol=1e-5, atol=1e-6)


def test_sm90_scores_refuse_what_the_tensor_core_kernels_do_not_take(kernel_device):
    cfg = parse_sparse_config(SMALL)
    q, k, _ = random_case(8, 2, 64, 900, 20, torch.bfloat16, seed=1, device=kernel_device)
    ck = _compressed(cfg, k, 900)
    if _K().sm90_attention_rejection(q) is not None:
        pytest.skip(_K().sm90_attention_rejection(q))
    pos = torch.arange(880, 900, device=kernel_device)
    path = ck[:2].unsqueeze(0).expand(20, 2, 2, 64).contiguous()  # a tree's own kernels
    for bad, own in ((q.float(), None), (q, path)):  # fp32; a tree (one wgmma cannot give a token its kernels)
        with pytest.raises(ValueError, match="Hopper score kernels take"):
            _K().sparse_select_blocks(bad, ck.to(bad.dtype), pos, cfg, 0.125, 0, 880, 15, own, sm90=True)


@pytest.mark.parametrize("t", [3, 40])  # 6 (query, KV head) blocks of 1024 threads; 80 of 256
def test_select_breaks_exact_ties_by_the_lower_block(kernel_device, t):
    """Every compressed key the same: every kernel of a query has the same probability, so every
    candidate block scores exactly the same; the top-k are then the lowest-numbered candidates, as
    the torch path's stable sort picks them."""
    cfg = parse_sparse_config(SMALL)
    s = 1_500
    q, k, _ = random_case(8, 2, 64, s, t, torch.bfloat16, seed=t, device=kernel_device)
    ck = _compressed(cfg, k, s)
    ck[:] = ck[:1].clone()
    positions = torch.arange(s - t, s, device=kernel_device)
    words = _K().sparse_select_blocks(q, ck, positions, cfg, 0.125, 0, s, -(-s // 64))
    bits = _unpack(words)[..., :24].cpu()
    window = cfg.window_size // cfg.block_size
    for i, pos in enumerate(positions.tolist()):
        own = pos // 64
        want = {0} | set(range(1, 1 + cfg.topk)) | set(range(own - window + 1, own + 1))
        got = [set(torch.nonzero(bits[i, g]).flatten().tolist()) for g in range(2)]
        assert got == [want, want], f"query at {pos}: {got} vs {sorted(want)}"


@pytest.mark.parametrize("init_blocks, window_size, topk", [
    (0, 16, 0),     # no init blocks, a one-block window, nothing scored
    (2, 32, 7),
    (1, 64, 200),   # top-k above the candidates: every block with a visible kernel
])
@pytest.mark.parametrize("hq, hkv, dim", [(4, 1, 128), (8, 2, 64)])
def test_select_many_blocks_matches_oracle(kernel_device, init_blocks, window_size, topk, hq, hkv, dim):
    # 131 blocks (three mask words, a 256-entry sort), forced sparse from position 0: queries with
    # no complete kernel, and with kernels ending inside a block, select only their fixed blocks.
    cfg = parse_sparse_config({**FINE, "init_blocks": init_blocks, "window_size": window_size, "topk": topk})
    s = 2_093
    positions = _positions(0, s, 20, [0, 3, 7, 8, 11, 15, 16, 19, 31, 32, 63, 64, 1023, 1024, s - 1], seed=topk)
    q, k, _ = random_case(hq, hkv, dim, s, len(positions), torch.float16, seed=init_blocks + dim, device=kernel_device)
    _check_selection(cfg, q, k, positions, s, 0)


# 140.8 blocks (three words), 562 kernels, above dense_len 8192; on the GPU also 256.4 blocks and
# 1024 kernels: a partial last block and pool window.
MINICPM4_DECODE = device_cases(emulated=[(9_011,)], gpu=[(9_011,), (16_411,)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("kernel_device, s", MINICPM4_DECODE, indirect=["kernel_device"])
def test_select_minicpm4_8b_decode_matches_oracle(kernel_device, s, dtype, t):
    cfg = parse_sparse_config(MINICPM4_8B)
    q, k, _ = random_case(32, 2, 128, s, t, dtype, seed=t, device=kernel_device)
    words, _ = _check_selection(cfg, q, k, list(range(s - t, s)), s, cfg.dense_len)
    assert _unpack(words[-1]).sum(dim=-1).tolist() == [1 + 32 + 64] * 2


@pytest.mark.parametrize("hq, hkv, dim", [
    (6, 3, 40),      # a head dim that is no multiple of the 128 threads or a warp
    (8, 2, 72),
    (32, 1, 256),    # 70 KB of score shared memory: above the 48 KB default (opt-in)
    (64, 1, 192),    # the largest group, 82 KB
])
def test_select_head_shapes_and_strided_inputs_match_oracle(kernel_device, hq, hkv, dim):
    cfg = parse_sparse_config(FINE)
    s = 700
    positions = [0, 40, 100, 101, 355, 650, 699]
    q, k, _ = random_case(hq, hkv, dim, s, len(positions), torch.bfloat16, seed=hq + dim, device=kernel_device)
    # q as the head slice of a fused QKV row, k as the K half of an interleaved KV cache.
    fused = torch.randn(len(positions), hq + 2 * hkv, dim).to(kernel_device, torch.bfloat16)
    fused[:, :hq] = q
    cache = torch.randn(s, 2, hkv, dim).to(kernel_device, torch.bfloat16)
    cache[:, 0] = k
    _check_selection(cfg, fused[:, :hq], cache[:, 0], positions, s, 0)


def test_select_tree_uses_the_prefix_and_ignores_scratch_contents(kernel_device, monkeypatch):
    cfg = parse_sparse_config(SMALL)
    prefix, t = 1_500, 9
    depth = [0, 1, 1, 2, 2, 3, 3, 4, 5]
    q, k, _ = random_case(16, 2, 128, prefix + t, t, torch.bfloat16, seed=9, device=kernel_device)
    positions = [prefix + d for d in depth]
    ck = _compressed(cfg, k, prefix)
    words, _ = _check_selection(cfg, q, k, positions, prefix, cfg.dense_len, ck=ck)
    nb = (prefix + t + 63) // 64
    pos = torch.tensor(positions, device=kernel_device)
    # kv_limit read on the device (graph capture) gives the same words.
    device_limit = torch.tensor([prefix], dtype=torch.int32, device=kernel_device)
    assert torch.equal(_K().sparse_select_blocks(q, ck, pos, cfg, 128 ** -0.5, cfg.dense_len, device_limit, nb), words)
    # Other scratch and output contents (zeros, +inf, all-ones words): the result must not change.
    K = _K()
    for fill_float, fill_int in [(0.0, 0), (float("inf"), -1)]:
        monkeypatch.setattr(K, "_new_output", lambda shape, dtype, device, f=fill_float, i=fill_int:
                            torch.full(tuple(shape), f if dtype.is_floating_point else i, dtype=dtype, device=device))
        again = K.sparse_select_blocks(q, ck, pos, cfg, 128 ** -0.5, cfg.dense_len, prefix, nb)
        assert torch.equal(again, words)


# Score split lengths of the row-invariant selection, each with the kernels it runs: not a multiple
# of 64 kernels, the SIMT kernels (many splits); else the tensor-core ones, with one tile per split
# or (128) a shared tile before the tile holding a tree's own kernels.
SCORE_FAMILIES = {"simt": 32, "mma": 64, "mma-two-tiles": 128}


@pytest.mark.parametrize("family", list(SCORE_FAMILIES))
@pytest.mark.parametrize("raw, prefix, t, hq, dim", [(FINE, 300, 20, 8, 64), (SMALL, 700, 12, 8, 64),
                                                     (SMALL, 1_100, 9, 32, 128)])  # MiniCPM4-8B's heads
def test_select_tree_with_its_paths_kernels_scores_as_decoding_does(kernel_device, monkeypatch, raw, prefix, t, hq,
                                                                    dim, family):
    """Row invariance of the selection: a tree token scored with its path's own kernels (the ones
    its path completes past the prefix) and a fixed score split length gets bitwise the block
    scores (the scratch is compared) and the selection of decoding its path, whatever T and the
    cache length, and whatever empty splits the tree's longer cache adds; on both score kernel
    families (the row maxima in the scratch say which one ran: the tensor-core kernels keep base-2
    logits)."""
    from edgespec.ops import backend
    from edgespec.ops.sparse_attention import path_kernels
    from test_sparse_cpu import _random_tree

    monkeypatch.setattr(backend, "use_kernel", lambda *tensors: True)  # path_kernels compresses on the kernel
    cfg = parse_sparse_config(raw)
    K = _K()
    captured = []
    real_new = K._new_output

    def recording(shape, dtype, device):
        out = real_new(shape, dtype, device)
        captured.append(out)
        return out

    monkeypatch.setattr(K, "_new_output", recording)
    per_split = SCORE_FAMILIES[family]  # several splits: their merge is part of what must not vary
    scale = 0.125

    def select(q, ck, positions, kv_limit, nb, path=None):
        captured.clear()
        words = K.sparse_select_blocks(q, ck, positions, cfg, scale, 0, kv_limit, nb, path, per_split)
        scores = next(x for x in captured if x.dim() == 3 and x.dtype == torch.float32)
        row_max = next(x for x in captured if x.dim() == 4)[..., 0].amax(dim=0)  # [T, Hq]
        if q.shape[0] == 1:  # which kernels ran: their logits' base
            logits = torch.einsum("hd,chd->hc", q[0].float(), ck[:cfg.num_kernels(kv_limit)].float()
                                  .repeat_interleave(hq // 2, dim=1)) * scale
            base = math.log2(math.e) if family != "simt" else 1.0
            torch.testing.assert_close(row_max[0].cpu(), logits.amax(dim=1).cpu() * base, rtol=1e-4, atol=1e-4)
        return words, scores

    tree, depth = _random_tree(t, torch.Generator().manual_seed(t))
    q, k, _ = random_case(hq, 2, dim, prefix + t, t, torch.bfloat16, seed=prefix, device=kernel_device)
    positions = torch.tensor([prefix + x for x in depth], device=kernel_device)
    nb = -(-(prefix + t) // cfg.block_size)
    path = path_kernels(k, prefix, tree.to(kernel_device), cfg.kernel_size, cfg.kernel_stride)
    words, scores = select(q, _compressed(cfg, k, prefix), positions, prefix, nb, path)
    own_kernels = 0
    for node in range(t):
        order = sorted((j for j in range(t) if tree[node, j]), key=lambda j: depth[j])
        seq = torch.cat([k[:prefix], k[prefix + torch.tensor(order, device=k.device)]])
        length = seq.shape[0]
        dec_words, dec_scores = select(q[node:node + 1], _compressed(cfg, seq, length), positions[node:node + 1],
                                       length, -(-length // cfg.block_size))
        visible = cfg.num_kernels(length)
        own_kernels += visible - cfg.num_kernels(prefix)
        assert torch.equal(scores[node, :, :visible], dec_scores[0, :, :visible]), f"tree token {node}"
        width = dec_words.shape[-1]
        assert torch.equal(words[node, :, :width], dec_words[0]) and not words[node, :, width:].any()
    assert own_kernels > 0  # tokens whose paths complete kernels were checked


def test_device_lengths_follow_decode_steps(kernel_device):
    """The graph replay test's launches without the graph: the same launches (host bounds fixed for
    a jump of up to 48 tokens), with only the device-side lengths, kv_limit and position changing."""
    dev = kernel_device
    cfg = parse_sparse_config(SMALL)
    s_max = 1_300
    q_all, k, _ = random_case(16, 2, 128, s_max, 40, torch.bfloat16, seed=11, device=kernel_device)
    nb = (s_max + 63) // 64
    ck = torch.full((cfg.num_kernels(s_max), 2, 128), float("nan"), dtype=torch.bfloat16, device=dev)
    _K().compress_keys(k, ck, 0, 1_199, cfg.kernel_size, cfg.kernel_stride)
    lengths = torch.zeros(2, dtype=torch.int32, device=dev)
    kv_limit = torch.zeros(1, dtype=torch.int32, device=dev)
    pos = torch.zeros(1, dtype=torch.int64, device=dev)
    previous = 1_199
    for length in (1_200, 1_201, 1_215, 1_216, 1_263, 1_290):  # decode steps and jumps (accepted drafts)
        lengths.copy_(torch.tensor([previous, length], dtype=torch.int32))
        kv_limit.fill_(length)
        pos.fill_(length - 1)
        q = q_all[length % 40:length % 40 + 1]
        _K().compress_keys(k, ck, 0, 64, cfg.kernel_size, cfg.kernel_stride, lengths=lengths)
        mask = _K().sparse_select_blocks(q, ck, pos, cfg, 128 ** -0.5, cfg.dense_len, kv_limit, nb)
        eager = _K().sparse_select_blocks(q, ck, pos.clone(), cfg, 128 ** -0.5, cfg.dense_len, length, nb)
        assert torch.equal(mask, eager), f"device lengths at length {length}"
        _check_selection(cfg, q, k, [length - 1], length, cfg.dense_len, ck=ck)
        previous = length
    n = cfg.num_kernels(1_290)
    ref = sparse_ref.compressed_keys(k.cpu(), 1_290, params(cfg))
    torch.testing.assert_close(ck[:n].cpu().double(), ref, rtol=2 ** -8, atol=1e-6)
    assert torch.isnan(ck[n:]).all()


# --- attention over a block mask -----------------------------------------------------------------

def _attention_case(dtype, hq, hkv, dim, s, t, tree, seed, extra_words=0, strided=False, device="cpu"):
    from test_sparse_cpu import _random_tree

    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_case(hq, hkv, dim, s, t, dtype, seed=seed, device=device)
    if strided:
        # q as the head slice of a fused QKV row; k, v as the halves of an interleaved KV cache.
        fused = torch.randn(t, hq + 2 * hkv, dim, generator=gen).to(device, dtype)
        fused[:, :hq] = q
        cache = torch.stack([k, v], dim=1)  # [S, 2, Hkv, D]
        q, k, v = fused[:, :hq], cache[:, 0], cache[:, 1]
    prefix = s - t
    if tree:
        vis, depth = _random_tree(t, gen)
        positions = [prefix + d for d in depth]
        packed = ops.pack_tree_mask(vis).to(device)
    else:
        vis, positions, packed = None, list(range(prefix, s)), None
    nb = (s + 63) // 64
    blocks, _ = random_selection(positions, hkv, nb, 64, gen, 0.3)
    if t > 1:
        blocks[1][0] = []  # a token that selects no prefix block: zeros (causal) or its tree only
    # Bits past each token's own block (and in `extra_words` words past the last block) are set at
    # random: the kernel must ignore them.
    words_n = (nb + 63) // 64 + extra_words
    noisy = [[sorted(set(chosen) | {b for b in range(pos // 64 + 1, 64 * words_n)
                                    if torch.rand(1, generator=gen).item() < 0.5}) for chosen in rows]
             for pos, rows in zip(positions, blocks)]
    return q, k, v, vis, positions, packed, blocks, pack_blocks(noisy, words_n).to(device)


ATTENTION_CASES = [
    (32, 2, 128, 2_011, 1, False),  # MiniCPM4-8B decode (1x4-warp tile)
    (4, 1, 128, 1_500, 3, False),   # GQA 4, three tokens in one 16-row block (1x4-warp tile)
    (32, 2, 128, 700, 20, False),   # a prefill chunk: 640 rows, 8x1-warp tiles
    (1, 1, 64, 400, 130, False),    # GQA 1: 128 tokens per 128-row tile, then a partial tile
    (16, 4, 64, 1_099, 5, False),   # GQA 4, a partial last block, 4x1-warp tiles
    (8, 8, 64, 601, 19, True),      # GQA 1, tree verification over a sparse prefix
    (2, 1, 64, 300, 70, True),      # a tree over three row tiles; one key tile holds prefix and tree slots
    (16, 1, 128, 333, 1, True),     # GQA 16, a one-token tree (1x4-warp tile with a tree mask)
]
# On the GPU also long contexts: a MiniCPM4-8B decode at 9K, a prefill chunk at 5K, a partial last
# block at 4K, a tree over a 3K sparse prefix.
ATTENTION_LONG = [(32, 2, 128, 9_000, 1, False), (32, 2, 128, 5_000, 77, False), (16, 4, 64, 4_099, 5, False),
                  (8, 8, 64, 3_001, 19, True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel_device, hq, hkv, dim, s, t, tree",
                         device_cases(ATTENTION_CASES, ATTENTION_CASES + ATTENTION_LONG), indirect=["kernel_device"])
@pytest.mark.parametrize("splits", [None, 1, 7])
@pytest.mark.parametrize("sm90", [False, True], ids=["generic", "sm90"])
def test_attention_kernel_with_block_mask_matches_oracle(kernel_device, dtype, hq, hkv, dim, s, t, tree, splits, sm90):
    """The generic kernels and the Hopper ones (skipped on a GPU that is not compute capability 9.0),
    whose 128-row blocks span up to 129 tokens' selections (GQA 1) or a few (GQA 16)."""
    # splits=7 also runs on strided views and with a spare mask word.
    q, k, v, vis, positions, packed, blocks, words = _attention_case(
        dtype, hq, hkv, dim, s, t, tree, seed=s + t, extra_words=int(splits == 7), strided=splits == 7,
        device=kernel_device)
    assert _K().block_mask_rejection(q, k, words) is None
    if sm90 and _K().sm90_attention_rejection(q) is not None:
        pytest.skip(_K().sm90_attention_rejection(q))
    scale = dim ** -0.5
    out = _K().attention(q, k, v, scale, packed, splits=splits, block_mask=words, sm90=sm90)
    ref = sparse_ref.attend_blocks(q.cpu(), k.cpu(), v.cpu(), positions, scale, 64, blocks, vis)
    # PyTorch's own error at this precision, with the same mask, sets the tolerance (a row that
    # sees nothing is NaN there, zeros in the kernel and the oracle).
    allowed = allowed_keys(t, hq, hkv, s, positions, blocks, vis).to(kernel_device)
    torch_out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], attn_mask=allowed.transpose(0, 1)[None],
                                               scale=scale, enable_gqa=hq != hkv)[0].transpose(0, 1)
    torch_err = (torch_out.double().cpu().nan_to_num(0.0) - ref).abs().max().item()
    err = (out.double().cpu() - ref).abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= 2 * torch_err + 1e-3, f"kernel error {err} vs torch {torch_err}"
    if t > 1 and tree is False:
        assert not out[1, :hq // hkv].any(), "a token that selects nothing must get zeros"


# --- the op layer on the kernels -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# Selection on the kernels: a short chain, a longer one (tensor cores), a tree; as a torch GEMM: a
# longer chain with G = 7 (the tensor-core score kernels need G dividing 16).
@pytest.mark.parametrize("t, tree, hq", [(5, False, 8), (12, False, 8), (12, False, 14), (7, True, 8)])
def test_sparse_attention_op_on_kernels_matches_oracle(kernel_device, dtype, t, tree, hq, monkeypatch):
    from edgespec.ops import backend
    from test_sparse_cpu import _random_tree

    monkeypatch.setattr(backend, "use_kernel", lambda *tensors: True)
    K = _K()
    calls = []
    for name in ("attention", "sparse_select_blocks", "compress_keys"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _n=name, _f=real, **kw: calls.append((_n, kw.get("block_mask")))
                            or _f(*a, **kw))
    cfg = parse_sparse_config(SMALL)
    s = 900
    q, k, v = random_case(hq, 2, 64, s, t, dtype, seed=5 + t + hq, device=kernel_device)
    if tree:
        vis, depth = _random_tree(t, torch.Generator().manual_seed(t))
        positions, kv_limit = [s - t + d for d in depth], s - t
        tree_mask = ops.pack_tree_mask(vis).to(kernel_device)
    else:
        vis, positions, kv_limit, tree_mask = None, list(range(s - t, s)), s, None
    ck = torch.zeros(cfg.num_kernels(s), 2, 64, dtype=dtype, device=kernel_device)
    ops.compress_keys(k, ck, 0, kv_limit, cfg.kernel_size, cfg.kernel_stride)
    out = ops.sparse_attention(q, k, v, 0.125, ck, torch.tensor(positions, device=kernel_device), cfg,
                               dense_len=cfg.dense_len, kv_limit=kv_limit, tree_mask=tree_mask)
    names = [c[0] for c in calls]
    assert names[0] == "compress_keys" and names[-1] == "attention" and calls[-1][1] is not None
    # Chains of a few tokens, chains the tensor-core kernels take and trees (the row-invariant mode,
    # their paths' own kernels compressed by the kernel too) score on the kernels; other chains as a
    # torch GEMM.
    assert ("sparse_select_blocks" in names) == (t <= 8 or K.sparse_scores_mma(q, ck))
    assert names.count("compress_keys") == 1 + tree
    ref = sparse_ref.sparse_attention(q.cpu(), k.cpu(), v.cpu(), positions, 0.125, params(cfg), kv_limit, tree=vis)
    # Blocks whose scores the fp64 oracle finds within TIE of its last pick may swap (16-bit compressed
    # keys round differently): such queries are checked for an equivalent selection instead.
    selected = _unpack(calls[-1][1])
    near_tied = set()
    for i, blocks in enumerate(ref.selected):
        for g, want in enumerate(blocks or []):
            got = torch.nonzero(selected[i, g]).flatten().tolist()
            if got != want:
                assert sparse_ref.equivalent_selection(got, want, ref.scores[i][g], positions[i], params(cfg), TIE), \
                    f"token {i} head {g}: {got} vs oracle {want}"
                near_tied.add(i)
    assert len(near_tied) <= 1, f"{sorted(near_tied)} picked other near-tied blocks"
    keep = [i for i in range(t) if i not in near_tied]
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out.cpu().double()[keep], ref.out[keep], rtol=tol, atol=tol)


def test_sparse_prefill_takes_the_sm90_kernels_when_asked(kernel_device, monkeypatch):
    """EDGESPEC_SM90_ATTENTION=1 sends a block-sparse prefill chunk (64 packed rows and more) to the
    Hopper kernels, its scores and its attention, which match the oracle; a decode step keeps the
    generic kernels' row-invariant mode. Skipped on a GPU that is not compute capability 9.0."""
    from edgespec.ops import backend

    monkeypatch.setattr(backend, "use_kernel", lambda *tensors: True)
    monkeypatch.setenv("EDGESPEC_SM90_ATTENTION", "1")
    K = _K()
    cfg = parse_sparse_config(SMALL)
    s = 900
    chunk = random_case(8, 2, 64, s, 20, torch.bfloat16, seed=8, device=kernel_device)  # 20 tokens x 4 heads
    if K.sm90_attention_rejection(chunk[0]) is not None:
        pytest.skip(K.sm90_attention_rejection(chunk[0]))
    calls, selects = [], []
    real, real_select = K.attention, K.sparse_select_blocks
    monkeypatch.setattr(K, "attention", lambda *a, **kw: calls.append(kw.get("sm90", False)) or real(*a, **kw))
    monkeypatch.setattr(K, "sparse_select_blocks",
                        lambda *a, **kw: selects.append(kw.get("sm90", False)) or real_select(*a, **kw))
    ck = torch.zeros(cfg.num_kernels(s), 2, 64, dtype=torch.bfloat16, device=kernel_device)
    ops.compress_keys(chunk[1], ck, 0, s, cfg.kernel_size, cfg.kernel_stride)
    for t, q in ((20, chunk[0]), (1, chunk[0][-1:])):
        positions = list(range(s - t, s))
        out = ops.sparse_attention(q, *chunk[1:], 0.125, ck, torch.tensor(positions, device=kernel_device), cfg,
                                   dense_len=cfg.dense_len, kv_limit=s)
        assert calls[-1] == selects[-1] == (t == 20), f"T={t}: sm90 attention {calls[-1]}, scores {selects[-1]}"
        ref = sparse_ref.sparse_attention(q.cpu(), chunk[1].cpu(), chunk[2].cpu(), positions, 0.125, params(cfg), s)
        torch.testing.assert_close(out.cpu().double(), ref.out, rtol=3e-2, atol=3e-2)


def test_select_past_the_score_shared_memory_falls_back_to_torch(kernel_device, monkeypatch):
    from edgespec.ops import backend

    monkeypatch.setattr(backend, "use_kernel", lambda *tensors: True)
    cfg = parse_sparse_config(SMALL)
    q, k, _ = random_case(64, 1, 256, 300, 2, torch.bfloat16, seed=4, device=kernel_device)
    ck = _compressed(cfg, k, 300)
    pos = torch.tensor([298, 299], device=kernel_device)
    assert not _K().supports_sparse_select(q, ck, pos, cfg, 5)
    sel = ops.select_blocks(q, ck, pos, cfg, 256 ** -0.5, 0, 300, 5)
    monkeypatch.setattr(backend, "use_kernel", lambda *tensors: False)
    assert torch.equal(sel, ops.select_blocks(q, ck, pos, cfg, 256 ** -0.5, 0, 300, 5))


# --- thread order --------------------------------------------------------------------------------

@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_kernels")
def test_emulated_results_do_not_depend_on_the_thread_schedule(monkeypatch):
    """Emulator only. Every kernel bit-identical under forward, reverse and random round-robin
    orders (a read-after-write race shows) and under the serial orders, where one warp runs ahead
    as far as it can and cp.async lands early (a write-after-read race shows)."""
    kernel_device = torch.device("cpu")
    cfg = parse_sparse_config(FINE)
    s, t = 1_037, 3
    q, k, _ = random_case(16, 2, 128, s, t, torch.bfloat16, seed=77, device=kernel_device)
    chunk = random_case(16, 2, 128, s, 20, torch.bfloat16, seed=78, device=kernel_device)[0]  # tensor-core scores
    K = _K()
    real_new = K._new_output
    scratch = []
    monkeypatch.setattr(K, "_new_output", lambda shape, dtype, device: scratch.append(real_new(shape, dtype, device))
                        or scratch[-1])
    cases = [_attention_case(torch.bfloat16, *shape, seed=i) for i, shape in enumerate([
        (16, 2, 128, 1_037, 3, False),  # 4x1-warp tiles
        (32, 2, 128, 900, 1, False),    # decode: four warps on one row block, merged at the end
        (8, 1, 64, 500, 2, True),       # 1x4-warp tiles with a tree mask
        (2, 1, 64, 400, 70, False),     # 8x1-warp tiles
    ])]

    def run():
        ck = torch.full((cfg.num_kernels(s), 2, 128), float("nan"), dtype=torch.bfloat16)
        _K().compress_keys(k, ck, 0, 500, cfg.kernel_size, cfg.kernel_stride)
        _K().compress_keys(k, ck, 500, s, cfg.kernel_size, cfg.kernel_stride)
        # Three queries, two KV heads: nine score splits, then the 256-entry sort.
        words = _K().sparse_select_blocks(q, ck, torch.arange(s - t, s), cfg, 128 ** -0.5, 0, s, (s + 15) // 16)
        scratch.clear()
        chunk_words = _K().sparse_select_blocks(chunk, ck, torch.arange(s - 20, s), cfg, 128 ** -0.5, 0, s,
                                                (s + 15) // 16)
        scores = next(x for x in scratch if x.dim() == 3 and x.dtype == torch.float32)
        scratch.clear()
        sm90_words = _K().sparse_select_blocks(chunk, ck, torch.arange(s - 20, s), cfg, 128 ** -0.5, 0, s,
                                               (s + 15) // 16, sm90=True)  # the Hopper score kernels
        sm90_scores = next(x for x in scratch if x.dim() == 3 and x.dtype == torch.float32)
        outs = [_K().attention(cq, ck_, cv, 0.1, packed, splits=splits, block_mask=mask)
                for cq, ck_, cv, _, _, packed, _, mask in cases for splits in (None, 3)]
        return ([ck.view(torch.int16), words, chunk_words, scores, sm90_words, sm90_scores]
                + [o.view(torch.int16) for o in outs])

    monkeypatch.setenv("CUEMU_SCHEDULE", "forward")
    base = run()
    for schedule in ("reverse", "random:1234", "serial", "serial-reverse"):
        monkeypatch.setenv("CUEMU_SCHEDULE", schedule)
        for i, (a, b) in enumerate(zip(run(), base)):
            assert torch.equal(a, b), f"output {i} differs under CUEMU_SCHEDULE={schedule}"


@pytest.mark.parametrize("kernel_device, hq, hkv, dim, s, t, tree",
                         device_cases(ATTENTION_CASES[::2], ATTENTION_CASES + ATTENTION_LONG), indirect=["kernel_device"])
@pytest.mark.parametrize("sm90", [False, True], ids=["generic", "sm90"])
def test_block_mask_attention_reads_its_length_on_the_device(kernel_device, hq, hkv, dim, s, t, tree, sm90):
    """What a CUDA graph over a cache view needs of the block-sparse kernels (generic and Hopper):
    over a longer view (NaN past the length), with the length on the device and the mask widened by
    zero words to the view's tiles, they give bit for bit their result over the exact slots."""
    q, k, v, _, _, packed, _, words = _attention_case(torch.bfloat16, hq, hkv, dim, s, t, tree, seed=s * t,
                                                      device=kernel_device)
    if sm90 and _K().sm90_attention_rejection(q) is not None:
        pytest.skip(_K().sm90_attention_rejection(q))
    scale = dim ** -0.5
    exact = _K().attention(q, k, v, scale, packed, splits=3, block_mask=words, sm90=sm90)
    view = s + 333
    big_k = torch.full((view, hkv, dim), float("nan"), dtype=k.dtype, device=kernel_device)
    big_v = big_k.clone()
    big_k[:s], big_v[:s] = k, v
    wide = torch.zeros(t, hkv, -(-view // 4096), dtype=torch.int64, device=kernel_device)
    wide[..., :words.shape[2]] = words
    seqlen = torch.tensor([s], dtype=torch.int32, device=kernel_device)
    out = _K().attention(q, big_k, big_v, scale, packed, splits=3, block_mask=wide, seqlen=seqlen, sm90=sm90)
    assert torch.equal(out, exact)


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_kernels")
def test_emulated_block_mask_past_the_gpu_shared_memory_falls_back(monkeypatch):
    """Emulator only (CUEMU_MAX_SMEM). GQA 1, a 130-token chunk (128-row tiles) and a 64-word block
    mask stage 131 selection rows: 106 KB of shared memory per block. An H100 (227 KB) runs it; on
    a 99 KB GPU (sm_86/sm_89) the Python check sends the call to torch, and the C++ launcher,
    asked anyway, refuses it with a clear error instead of a failed launch."""
    from edgespec.errors import KernelError

    q, k, v, vis, positions, packed, blocks, words = _attention_case(
        torch.bfloat16, 1, 1, 64, 400, 130, False, seed=5, extra_words=63)
    assert words.shape[2] == 64
    K = _K()
    out = K.attention(q, k, v, 0.125, packed, block_mask=words)
    ref = sparse_ref.attend_blocks(q, k, v, positions, 0.125, 64, blocks, vis)
    assert (out.double() - ref).abs().max().item() < 2e-2

    monkeypatch.setenv("CUEMU_MAX_SMEM", "101376")
    need = K._module().attention_smem_bytes(64, 130, 1, False, 0, 64)
    assert need > 101376
    assert f"needs {need} bytes of shared memory per block; the GPU allows 101376" in \
        K.attention_smem_rejection(q, k, None, 64)
    assert K.attention_smem_rejection(q, k, None, 1) is None  # a short mask still fits
    with pytest.raises(ValueError, match="shared memory"):
        K.attention(q, k, v, 0.125, packed, block_mask=words)
    # The C++ launcher re-checks (the Python rejection bypassed).
    scratch = torch.empty_like(q)
    with pytest.raises(KernelError, match=f"needs {need} bytes of shared memory per block, the GPU allows 101376"):
        K._run(K._module().attention, K._view(q), K._view(k), K._view(v), None, K._view(scratch), None, None,
               0.125, 1, 0, K._view(words))


# --- rejections ----------------------------------------------------------------------------------

def test_kernel_entry_points_reject_bad_inputs(kernel_device):
    from edgespec.errors import KernelError

    cfg = parse_sparse_config(SMALL)
    K = _K()
    dev = kernel_device
    q = torch.randn(2, 8, 64, device=dev).bfloat16()
    k = torch.randn(200, 2, 64, device=dev).bfloat16()
    ck = torch.zeros(10, 2, 64, dtype=torch.bfloat16, device=dev)
    pos = torch.tensor([100, 101], device=dev)
    assert K.sparse_select_rejection(q, ck, pos, cfg, 3) is None
    assert "int64" in K.sparse_select_rejection(q, ck, pos.int(), cfg, 3)
    assert "dtype" in K.sparse_select_rejection(q, ck.float(), pos, cfg, 3)
    assert "at most" in K.sparse_select_rejection(q, ck, pos, cfg, 5000)
    assert "Hq % Hkv" in K.sparse_select_rejection(q[:, :7], ck, pos, cfg, 3)
    with pytest.raises(ValueError, match="sparse_select_blocks"):
        K.sparse_select_blocks(q, ck, pos.int(), cfg, 1.0, 0, 102, 3)
    # Past the Python checks (an unvalidated config): C++ re-checks the geometry.
    bad = SimpleNamespace(block_size=40, kernel_size=32, kernel_stride=16, init_blocks=1, window_blocks=2, topk=4)
    with pytest.raises(KernelError, match="block_size"):
        K.sparse_select_blocks(q, ck, pos, bad, 1.0, 0, 102, 3)
    assert "one per token" in K.sparse_select_rejection(q, ck, pos[:1], cfg, 3)
    # A tree's path kernels must be [T, E, Hkv, D] of q's dtype; C++ re-checks what Python sent.
    path = torch.zeros(2, 3, 2, 64, dtype=torch.bfloat16, device=dev)
    with pytest.raises(ValueError, match="path must be"):
        K.sparse_select_blocks(q, ck, pos, cfg, 1.0, 0, 100, 3, path=path[:1])
    with pytest.raises(ValueError, match="path must be"):
        K.sparse_select_blocks(q, ck, pos, cfg, 1.0, 0, 100, 3, path=path.float())
    assert K.sparse_select_blocks(q, ck, pos, cfg, 1.0, 0, 100, 3, path=path, per_split=32).shape == (2, 2, 1)

    def raw_select(partial, path_view):  # the binding, past the Python wrapper's checks
        K._run(K._module().sparse_select_blocks, K._view(q), K._view(ck), K._view(pos), K._view(
            torch.tensor([100], dtype=torch.int32, device=dev)), K._view(partial),
            K._view(torch.empty(2, 2, 32, device=dev)), K._view(torch.empty(2, 2, 1, dtype=torch.int64, device=dev)),
            3, 64, 32, 16, 1, 2, 4, 0, 32, 1.0, K._stream(q), K._view(path_view))

    with pytest.raises(KernelError, match="path"):
        raw_select(torch.empty(1, 2, 8, 2, device=dev), path[:, :, :1])
    with pytest.raises(KernelError, match="8-byte aligned"):  # its (max, sum) pairs are read as float2
        raw_select(torch.empty(33, device=dev)[1:].view(1, 2, 8, 2), path)
    # Group 64 with head dim 256 is within the group and head-dim bounds but needs 107 KB of score
    # shared memory: rejected here (the op layer then takes its torch path), not by a KernelError.
    big_q = torch.randn(2, 64, 256, device=dev).bfloat16()
    big_ck = torch.zeros(10, 1, 256, dtype=torch.bfloat16, device=dev)
    assert "shared memory" in K.sparse_select_rejection(big_q, big_ck, pos, cfg, 3)
    assert K.sparse_select_rejection(big_q[:, :48], big_ck, pos, cfg, 3) is None
    assert "kernel_stride" in K.compress_keys_rejection(k, ck, 16, 32)
    assert "expected keys" in K.compress_keys_rejection(k, ck[:, :1], 32, 16)
    good = torch.zeros(2, 2, 1, dtype=torch.int64, device=dev)
    assert K.block_mask_rejection(q, k, good) is None
    assert "int64" in K.block_mask_rejection(q, k, good.int())
    assert "int64" in K.block_mask_rejection(q, k, torch.zeros(2, 1, 1, dtype=torch.int64, device=dev))
    assert "contiguous" in K.block_mask_rejection(
        q, k, torch.zeros(2, 2, 2, dtype=torch.int64, device=dev).transpose(1, 2))
    with pytest.raises(ValueError, match="attention"):
        K.attention(q, k, k, 1.0, None, block_mask=torch.zeros(2, 2, 65, dtype=torch.int64, device=dev))


# --- GPU only: graph replay, the op layer's dispatch, generation over a long context ---------------

def _gpu_only(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("GPU only (the emulated equivalents: test_device_lengths_follow_decode_steps, "
                    "test_emulated_model.py)")


def test_selection_under_cuda_graph_replay_follows_device_lengths(kernel_device):
    _gpu_only(kernel_device)
    cfg = parse_sparse_config(SMALL)
    s_max = 1_300
    q_all, k, _ = random_case(16, 2, 128, s_max, 40, torch.bfloat16, seed=11, device="cuda")
    nb = (s_max + 63) // 64
    ck = torch.zeros(cfg.num_kernels(s_max), 2, 128, device="cuda", dtype=torch.bfloat16)
    lengths = torch.zeros(2, dtype=torch.int32, device="cuda")
    kv_limit = torch.zeros(1, dtype=torch.int32, device="cuda")
    q = torch.empty(1, 16, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")
    K = _K()

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


def test_op_layer_takes_the_block_sparse_attention_kernel(kernel_device, monkeypatch):
    _gpu_only(kernel_device)
    cfg = parse_sparse_config(SMALL)
    K = _K()
    calls = []
    real = K.attention
    monkeypatch.setattr(K, "attention", lambda *a, **kw: calls.append(kw.get("block_mask")) or real(*a, **kw))
    q, k, v = random_case(16, 2, 128, 2_000, 3, torch.bfloat16, seed=2, device="cuda")
    ck = torch.zeros(cfg.num_kernels(2_000), 2, 128, device="cuda", dtype=torch.bfloat16)
    ops.compress_keys(k, ck, 0, 2_000, cfg.kernel_size, cfg.kernel_stride)
    ops.sparse_attention(q, k, v, 0.1, ck, torch.arange(1_997, 2_000, device="cuda"), cfg, dense_len=512,
                         kv_limit=2_000)
    assert len(calls) == 1 and calls[0] is not None and calls[0].shape == (3, 2, 1)


def test_generation_keeps_old_generated_tokens_selectable(kernel_device, tiny_model_dir, monkeypatch):
    _gpu_only(kernel_device)
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


@pytest.mark.parametrize("sm90", [False, True], ids=["generic", "sm90"])
def test_sparse_speculation_is_lossless_on_the_gpu(kernel_device, tiny_model_dir, tmp_path, sm90, monkeypatch):
    """On the GPU kernels, past dense_len (a one-block window, top-1): every verified tree node's
    logits are bitwise its decoded logits, and greedy speculative output (the model as its own
    draft) equals plain output (emulated: test_emulated_model.py and test_sparse_cpu.py). sm90:
    EDGESPEC_SM90_ATTENTION=1 (rows below dense_len on the Hopper kernels' invariant mode, sparse
    prefill on them too)."""
    _gpu_only(kernel_device)
    use_attention_family(sm90, kernel_device, monkeypatch)
    from edgespec import LLM
    from edgespec.loading import load_model
    from edgespec.spec import disable_speculation, enable_speculation
    from test_sparse_cpu import _minicpm_sparse_dir
    from test_spec_helpers import assert_tree_rows_decode_alike

    path = _minicpm_sparse_dir(tiny_model_dir, window_size=64, topk=1, dense_len=64)
    model = load_model(str(path), device="cuda", dtype=torch.bfloat16, max_context=1024, with_tokenizer=False).model
    assert_tree_rows_decode_alike(model, prompt_len=187)
    llm = LLM(model)
    prompt = torch.randint(0, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    disable_speculation(llm)
    plain = llm.generate(prompt, max_new_tokens=60, ignore_eos=True).token_ids
    enable_speculation(llm, draft=str(path), tree_size=12, depth=6, topk=2)
    assert llm.generate(prompt, max_new_tokens=60, ignore_eos=True).token_ids == plain
