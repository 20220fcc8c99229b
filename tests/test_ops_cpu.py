"""The op layer's torch path against the naive references in tests/oracle, on CPU.

Tolerance (STYLE.md): |ours - oracle_fp64| <= K * |oracle at our precision - oracle_fp64| + atol,
where "oracle at our precision" is the same naive formula evaluated in plain PyTorch at the dtype
under test (the error PyTorch itself makes there) and atol = one unit of rounding of the output
dtype at the output's magnitude. Inputs are random normals (never zeros); sizes are odd.
Discrete results (masks, kept token sets, one-hot draws) are compared exactly; the sampler's
distribution is checked with a chi-square test.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from edgespec import ops
from edgespec.ops.linear import INVARIANT_ROWS
from oracle import ops as ref
from oracle import rope as ref_rope
from oracle.attention import (attention_ref, block_visibility, pack_bits, random_tree, tree_dense_visibility,
                              tree_visibility, unpack_bits, visibility)

K = 4.0  # how many times PyTorch's own rounding error at the tested precision we allow
UNIT = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_matches_oracle(ours: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, what: str) -> None:
    """ours: the op's output; exact: the oracle in float64; plain: the oracle at ours' dtype."""
    assert torch.isfinite(ours).all(), f"{what}: non-finite output"
    assert ours.shape == exact.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    err = (ours.double() - exact).abs().max().item()
    baseline = (plain.double() - exact).abs().max().item()
    atol = UNIT[ours.dtype] * max(exact.abs().max().item(), 1.0)
    assert err <= K * baseline + atol, (
        f"{what}: max error {err:.3g} exceeds {K} x torch's own {ours.dtype} error {baseline:.3g} + {atol:.3g}")


# --------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 111), (19, 576), (99, 111)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, tokens: int, hidden: int, with_residual: bool) -> None:
    x = randn(tokens, hidden, seed=1, dtype=dtype)
    w = (1 + 0.3 * randn(hidden, seed=2)).to(dtype)
    res = randn(tokens, hidden, seed=3, dtype=dtype) if with_residual else None
    out = ops.rms_norm(x, w, 1e-5, residual=res)
    exact = ref.rms_norm(x, w, 1e-5, residual=res)
    plain = ref.rms_norm(x, w, 1e-5, residual=res, dtype=dtype)
    if with_residual:
        (y, s), (ey, es), (py, ps) = out, exact, plain
        assert s.dtype == dtype
        assert_matches_oracle(s, es, ps, "rms_norm residual sum")
    else:
        y, ey, py = out, exact, plain
    assert y.dtype == dtype
    assert_matches_oracle(y, ey, py, "rms_norm")


def test_rms_norm_per_head_and_non_contiguous() -> None:
    # Qwen3's QK-norm normalises [T, H, D] over D; a transposed view must give the same result.
    x = randn(7, 19, 24, seed=4).transpose(0, 1)  # [19, 7, 24], non-contiguous
    w = 1 + 0.3 * randn(24, seed=5)
    assert not x.is_contiguous()
    assert_matches_oracle(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6),
                          ref.rms_norm(x, w, 1e-6, dtype=torch.float32), "rms_norm [T,H,D]")


# --------------------------------------------------------------------------- SiLU-mul, linear, embedding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 111), (19, 576), (99, 37)])
def test_silu_and_mul(dtype: torch.dtype, tokens: int, inter: int) -> None:
    x = 3 * randn(tokens, 2 * inter, seed=6, dtype=dtype)
    out = ops.silu_and_mul(x)
    assert out.dtype == dtype
    assert_matches_oracle(out, ref.silu_and_mul(x), ref.silu_and_mul(x, dtype=dtype), "silu_and_mul")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 19])
def test_linear_dense_fused_and_concat(dtype: torch.dtype, tokens: int) -> None:
    x = randn(tokens, 111, seed=7, dtype=dtype)
    parts = [ops.DenseLinear(randn(n, 111, seed=8 + n, dtype=dtype), randn(n, seed=9 + n, dtype=dtype))
             for n in (99, 19, 19)]
    exact = torch.cat([ref.linear(x, p.weight, p.bias) for p in parts], dim=-1)
    plain = torch.cat([ref.linear(x, p.weight, p.bias, dtype=dtype) for p in parts], dim=-1)
    fused = ops.fuse_linears(parts)
    assert isinstance(fused, ops.DenseLinear) and (fused.out_features, fused.in_features) == (137, 111)
    assert_matches_oracle(fused(x), exact, plain, "fused linear")
    concat = ops.ConcatLinear(parts)
    assert_matches_oracle(concat(x), exact, plain, "concat linear")
    # A bias-free part fused with biased ones gets zeros, not garbage.
    mixed = ops.DenseLinear.fuse([ops.DenseLinear(parts[0].weight), parts[1]])
    assert torch.equal(mixed.bias[:99], torch.zeros(99, dtype=dtype))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_f,in_f", [(576, 1536), (960, 576), (211, 96)])
def test_linear_rows_are_bitwise_independent_of_batch(dtype: torch.dtype, out_f: int, in_f: int, threads: int) -> None:
    """A row alone gives bitwise what it gives among others (a token decoded alone vs inside a
    verified tree: the speculative invariant in bf16 rests on it), for row counts either side of
    the CPU BLAS's kernel switch at 32 rows (ops.linear splits larger calls) and of a lone row left
    by the split, up to INVARIANT_ROWS (a tree of 127 tokens and its root). (576, 1536) is SmolLM2's
    down projection, where the single-row bf16 kernel rounds differently. Past INVARIANT_ROWS (prefill
    chunks) a call is one GEMM, the same products rounded its own way. (fp32 GEMMs on the CPU are not
    row-invariant: fp32 speculative tests guard against near-ties.)"""
    limit = INVARIANT_ROWS
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = randn(limit + 72, in_f, seed=3, dtype=dtype)
        w, b = randn(out_f, in_f, seed=4, dtype=dtype), randn(out_f, seed=5, dtype=dtype)
        alone = torch.cat([ops.linear(x[i:i + 1], w, b) for i in range(limit)])
        assert torch.equal(ops.linear(x[5], w, b), alone[5]), "1-D row"
        for rows in (2, 13, 31, 32, 33, 64, 65, 97, limit - 1, limit):
            assert torch.equal(ops.linear(x[:rows], w, b), alone[:rows]), f"{rows} rows"
        assert torch.equal(ops.linear(x[:40].view(4, 10, in_f), w, b), alone[:40].view(4, 10, out_f)), "3-D input"
        chunk = ops.linear(x, w, b)
        assert torch.equal(chunk, F.linear(x, w, b)), "a prefill chunk is one GEMM"
        assert_matches_oracle(chunk, ref.linear(x, w, b), ref.linear(x, w, b, dtype=dtype), f"{x.shape[0]} rows")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,inter", [(1, 111, 99), (19, 576, 1536)])
def test_gated_mlp(dtype: torch.dtype, tokens: int, hidden: int, inter: int) -> None:
    from edgespec.models.decoder import GatedMLP

    x = randn(tokens, hidden, seed=12, dtype=dtype)
    gate, up = randn(inter, hidden, seed=13, dtype=dtype) / 8, randn(inter, hidden, seed=14, dtype=dtype) / 8
    down = randn(hidden, inter, seed=15, dtype=dtype) / 16
    mlp = GatedMLP(ops.fuse_linears([ops.DenseLinear(gate), ops.DenseLinear(up)]), ops.DenseLinear(down))
    assert_matches_oracle(mlp(x), ref.gated_mlp(x, gate, up, down), ref.gated_mlp(x, gate, up, down, dtype=dtype),
                          "gated MLP")


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_with_scale(dtype: torch.dtype) -> None:
    table = randn(211, 111, seed=10, dtype=dtype)
    ids = torch.tensor([0, 210, 17, 17, 99, 1])
    plain = ops.embedding(ids, table)
    assert torch.equal(plain, ref.embedding(ids, table).to(dtype))  # a gather is exact
    scaled = ops.embedding(ids, table, scale=12.0)
    assert_matches_oracle(scaled, ref.embedding(ids, table, 12.0), ref.embedding(ids, table, 12.0, dtype=dtype),
                          "embedding * scale")


# --------------------------------------------------------------------------- RoPE

ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "yarn-mscale": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
    "yarn-untruncated": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                         "truncate": False},
    # No original length: the model's max_position_embeddings is the pretraining length, not the
    # table's size (the table below is built for more positions than the model's maximum).
    "yarn-no-original": {"rope_type": "yarn", "factor": 4.0},
    "longrope": {"rope_type": "longrope", "long_factor": [1.0 + 0.5 * i for i in range(12)],
                 "short_factor": [1.0 + 0.05 * i for i in range(12)], "original_max_position_embeddings": 256},
    "longrope-factor": {"rope_type": "longrope", "long_factor": [1.0 + 0.5 * i for i in range(12)],
                        "short_factor": [1.0] * 12, "original_max_position_embeddings": 256, "factor": 3.0},
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
@pytest.mark.parametrize("max_positions", [200, 1000])
def test_rope_table_every_scaling(case: str, max_positions: int) -> None:
    """cos/sin tables vs the oracle's per-dimension formulas; 1000 > the original 256 positions
    (LongRoPE switches to its long factors), 200 < it."""
    scaling = ROPE_CASES[case]
    rotary_dim, theta, model_max = 24, 10000.0, 512
    table = ops.build_rope_table(rotary_dim, theta, max_positions, scaling, model_max)
    inv_freq, attn = ref_rope.inv_freq_and_attention_factor(rotary_dim, theta, scaling, model_max, max_positions)
    cos, sin = ref_rope.rope_tables(inv_freq, attn, torch.arange(max_positions))
    assert table.cos.dtype == torch.float32 and table.cos.shape == (max_positions, rotary_dim // 2)
    # fp64 angles rounded once to fp32: one fp32 unit of the attention factor.
    torch.testing.assert_close(table.cos.double(), cos, rtol=0, atol=4 * UNIT[torch.float32] * attn)
    torch.testing.assert_close(table.sin.double(), sin, rtol=0, atol=4 * UNIT[torch.float32] * attn)


def test_rope_longrope_picks_factor_set_by_context() -> None:
    scaling = ROPE_CASES["longrope"]
    short = ops.build_rope_table(24, 10000.0, 256, scaling, 512)
    long = ops.build_rope_table(24, 10000.0, 257, scaling, 512)
    # Position 100 rotates differently with the long factors (only dim 0 has factor 1 in both sets).
    assert torch.allclose(short.cos[100, 0], long.cos[100, 0])
    assert not torch.allclose(short.cos[100, 1:], long.cos[100, 1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hk,head_dim,rotary_dim", [(1, 9, 3, 64, 64), (19, 7, 1, 24, 24),
                                                               (99, 4, 4, 24, 16)])
def test_apply_rope(dtype: torch.dtype, tokens: int, hq: int, hk: int, head_dim: int, rotary_dim: int) -> None:
    scaling = ROPE_CASES["yarn"]
    table = ops.build_rope_table(rotary_dim, 10000.0, 1000, scaling, 512)
    q = randn(tokens, hq, head_dim, seed=11, dtype=dtype)
    k = randn(hk, tokens, head_dim, seed=12, dtype=dtype).transpose(0, 1)  # non-contiguous
    positions = torch.randperm(1000, generator=torch.Generator().manual_seed(tokens))[:tokens]
    inv_freq, attn = ref_rope.inv_freq_and_attention_factor(rotary_dim, 10000.0, scaling, 512, 1000)
    cos, sin = ref_rope.rope_tables(inv_freq, attn, positions)
    oq, ok = ops.apply_rope(q, k, positions, table)
    assert oq.dtype == dtype and ok.dtype == dtype
    for name, ours, x in (("q", oq, q), ("k", ok, k)):
        assert_matches_oracle(ours, ref_rope.apply_rope(x, cos, sin), ref_rope.apply_rope(x, cos, sin, dtype=dtype),
                              f"apply_rope {name}")
        assert torch.equal(ours[..., rotary_dim:], x[..., rotary_dim:])  # pass-through dims untouched


# --------------------------------------------------------------------------- attention


def _qkv(t: int, s: int, hq: int, hkv: int, d: int, seed: int, dtype: torch.dtype):
    return (randn(t, hq, d, seed=seed, dtype=dtype), randn(s, hkv, d, seed=seed + 1, dtype=dtype),
            randn(s, hkv, d, seed=seed + 2, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,s", [(1, 1), (1, 99), (19, 19), (19, 120), (99, 99)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (7, 1)])
def test_attention_causal(dtype: torch.dtype, t: int, s: int, hq: int, hkv: int) -> None:
    d = 64
    q, k, v = _qkv(t, s, hq, hkv, d, seed=t * 7 + s, dtype=dtype)
    vis = visibility(t, s)
    out = ops.attention(q, k, v, d ** -0.5)
    assert out.dtype == dtype
    assert_matches_oracle(out, attention_ref(q, k, v, d ** -0.5, dense_visibility=vis, dtype=torch.float64),
                          attention_ref(q, k, v, d ** -0.5, dense_visibility=vis, dtype=dtype), "causal attention")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,prefix,hq,hkv", [(1, 5, 4, 4), (19, 33, 8, 2), (70, 0, 7, 1), (130, 17, 4, 1)])
def test_attention_tree(dtype: torch.dtype, t: int, prefix: int, hq: int, hkv: int) -> None:
    """Trees larger than 64 and 128 tokens: several mask words per row."""
    d = 40
    q, k, v = _qkv(t, prefix + t, hq, hkv, d, seed=t + prefix, dtype=dtype)
    tree = tree_visibility(random_tree(t, torch.Generator().manual_seed(t)))
    packed = ops.pack_tree_mask(tree)
    vis = tree_dense_visibility(tree, prefix + t)
    out = ops.attention(q, k, v, 0.15, tree_mask=packed)
    assert_matches_oracle(out, attention_ref(q, k, v, 0.15, dense_visibility=vis, dtype=torch.float64),
                          attention_ref(q, k, v, 0.15, dense_visibility=vis, dtype=dtype), "tree attention")


def test_attention_non_contiguous_cache_views() -> None:
    # The decoder passes [S, Hkv, D] views of a [L, S_max, Hkv, D] cache and reshaped q.
    cache = randn(3, 50, 2, 32, seed=20)
    k, v = cache[1, :41], cache[2, :41]
    q = randn(8, 5, 32, seed=21).transpose(0, 1)  # [5, 8, 32]
    vis = visibility(5, 41)
    assert_matches_oracle(ops.attention(q, k, v, 0.2), attention_ref(q, k, v, 0.2, dense_visibility=vis,
                                                                      dtype=torch.float64),
                          attention_ref(q, k, v, 0.2, dense_visibility=vis), "attention on views")


def test_chain_tree_equals_causal_and_block_sparse_oracle_is_consistent() -> None:
    t, prefix = 21, 150
    q, k, v = _qkv(t, prefix + t, 6, 2, 16, seed=30, dtype=torch.float32)
    chain = torch.tril(torch.ones(t, t, dtype=torch.bool))
    assert_matches_oracle(ops.attention(q, k, v, 0.25, tree_mask=ops.pack_tree_mask(chain)),
                          attention_ref(q, k, v, 0.25, dtype=torch.float64), attention_ref(q, k, v, 0.25),
                          "chain tree vs causal")
    # Block-sparse oracle: selecting every block is causal attention; per-KV-head selections
    # equal attention computed separately over each head's own visible keys.
    every = block_visibility([list(range(3))] * t, prefix + t)
    assert torch.equal(every, visibility(t, prefix + t))
    sel = torch.stack([block_visibility([[0, 2]] * t, prefix + t), block_visibility([[1]] * t, prefix + t)])
    both = attention_ref(q, k, v, 0.25, dense_visibility=sel, dtype=torch.float64)
    for g in range(2):
        alone = attention_ref(q[:, 3 * g:3 * g + 3], k[:, g:g + 1], v[:, g:g + 1], 0.25,
                              dense_visibility=sel[g], dtype=torch.float64)
        torch.testing.assert_close(both[:, 3 * g:3 * g + 3], alone, rtol=0, atol=1e-12)
        # Keys of block 1 (slots 64..127) are invisible to head group 0 but visible to group 1.
        assert not sel[0][:, 64:128].any() and sel[1][:, 64:128].all()


# --------------------------------------------------------------------------- tree mask packing


@pytest.mark.parametrize("t", [1, 19, 63, 64, 65, 130])
def test_pack_unpack_round_trip(t: int) -> None:
    dense = torch.rand(t, t, generator=torch.Generator().manual_seed(t)) < 0.5
    packed = ops.pack_tree_mask(dense)
    assert packed.dtype == torch.int64 and packed.shape == (t, ops.tree_mask_words(t))
    assert torch.equal(packed, pack_bits(dense))                  # bit-exact vs the oracle's packing
    assert torch.equal(ops.unpack_tree_mask(packed, t), dense)
    assert torch.equal(unpack_bits(packed, t), dense)


def test_pack_sets_sign_bit_for_token_63() -> None:
    dense = torch.zeros(65, 65, dtype=torch.bool)
    dense[5, 63] = True
    dense[5, 64] = True
    packed = ops.pack_tree_mask(dense)
    assert packed[5].tolist() == [-(1 << 63), 1]


# --------------------------------------------------------------------------- sampling


def test_argmax_lowest_index_wins_ties() -> None:
    logits = randn(5, 1001, seed=40)
    logits[1, 7] = logits[1, 500] = logits[1].max() + 1.0
    logits[3] = 0.5
    got = ops.argmax(logits)
    assert got.tolist() == ref.argmax(logits).tolist()
    assert got[1] == 7 and got[3] == 0


SAMPLING_SETTINGS = [(1.0, 0, 1.0, 0.0), (0.7, 50, 1.0, 0.0), (1.3, 0, 0.9, 0.0), (0.5, 200, 0.8, 0.0),
                     (1.0, 5, 0.3, 0.0), (2.0, 1000, 0.99, 0.0), (1.0, 0, 1.0, 0.05), (0.8, 100, 0.95, 0.2),
                     (1.5, 0, 0.7, 0.01)]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SAMPLING_SETTINGS)
def test_logits_to_probs_matches_oracle(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    logits = 3 * randn(3, 1001, seed=41)
    probs = ops.logits_to_probs(logits, temperature, top_k, top_p, min_p)
    assert probs.dtype == torch.float32
    for row in range(3):
        expected = ref.sampling_probs(logits[row], temperature, top_k, top_p, min_p)
        assert torch.equal(probs[row] > 0, expected > 0), "kept token set differs"
        torch.testing.assert_close(probs[row].double(), expected, rtol=1e-5, atol=1e-7)
        if top_k:
            assert int((probs[row] > 0).sum()) <= top_k


@pytest.mark.parametrize("scale, kept", [(8.0, (1, 256)), (1.5, (257, 4096)), (0.3, (4097, 6000))])
def test_nucleus_of_a_large_vocabulary_matches_oracle(scale: float, kept: tuple[int, int]) -> None:
    """The CPU finds the nucleus among the top 256 tokens, then the top 4096, then by a full sort:
    peaked, broader and flat distributions over 6000 tokens take each way and keep what the
    oracle keeps."""
    logits = scale * randn(4, 6000, seed=43)
    probs = ops.logits_to_probs(logits, 1.0, top_p=0.9)
    for row in range(4):
        expected = ref.sampling_probs(logits[row], 1.0, 0, 0.9)
        assert torch.equal(probs[row] > 0, expected > 0), "kept token set differs"
        torch.testing.assert_close(probs[row].double(), expected, rtol=1e-5, atol=1e-7)
        assert kept[0] <= int((probs[row] > 0).sum()) <= kept[1]


def test_one_hot_distributions_sample_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    logits = randn(4, 99, seed=42)
    one_hot = ops.logits_to_probs(logits, 0.8, top_k=1)
    assert torch.equal(one_hot.max(dim=-1).values, torch.ones(4))
    for _ in range(20):
        assert torch.equal(ops.sample(one_hot, g), ops.argmax(logits))
    # top_p so small that only the most likely token survives.
    tiny_p = ops.logits_to_probs(logits, 1.0, top_p=1e-6)
    assert torch.equal(ops.sample(tiny_p, g), ops.argmax(logits))
    # min_p = 1 keeps only the tokens as probable as the most likely one.
    full_min_p = ops.logits_to_probs(logits, 1.3, min_p=1.0)
    assert torch.equal(ops.sample(full_min_p, g), ops.argmax(logits))
    explicit = torch.zeros(3, 19)
    explicit[0, 18] = explicit[1, 0] = explicit[2, 7] = 1.0
    assert ops.sample(explicit, g).tolist() == [18, 0, 7]


def test_sample_follows_logits_to_probs_chi_square() -> None:
    """200,000 seeded draws of ops.sample vs the expected counts of logits_to_probs over the kept
    tokens: Pearson chi-square, reject below p = 1e-3 (the seed is fixed, so the test is
    deterministic; a correct sampler fails it for 0.1% of seeds). No draw may fall outside."""
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.2, 0.9, 1.1, -1.0, 0.0, 0.6, -3.0, 1.8])
    probs = ops.logits_to_probs(logits, temperature=0.8, top_k=9, top_p=0.95)
    kept = (probs > 0).nonzero().squeeze(-1)
    assert 3 < kept.numel() < 9  # both filters are active
    n = 200_000
    draws = ops.sample(probs.expand(n, -1).contiguous(), torch.Generator().manual_seed(1234))
    counts = torch.bincount(draws, minlength=12).double()
    assert counts[probs == 0].sum() == 0, "sampled a token that the filters removed"
    p_kept = probs.double()[kept]
    expected = p_kept / p_kept.sum() * n  # exact total: fp32 probs sum to 1 only within rounding
    assert expected.min() > 5  # the chi-square approximation holds
    result = stats.chisquare(counts[kept].numpy(), expected.numpy())
    assert result.pvalue > 1e-3, f"chi-square p-value {result.pvalue:.2e}: ops.sample does not follow its probs"


def test_sample_is_reproducible_with_a_seeded_generator() -> None:
    probs = ops.logits_to_probs(randn(16, 1001, seed=43), 1.0)
    a = ops.sample(probs, torch.Generator().manual_seed(5))
    b = ops.sample(probs, torch.Generator().manual_seed(5))
    c = ops.sample(probs, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- dequantisation oracle


def test_int4_dequant_oracle_formula() -> None:
    q = torch.randint(0, 16, (19, 96), generator=torch.Generator().manual_seed(50))
    scales = torch.rand(19, 3, generator=torch.Generator().manual_seed(51)) + 0.1
    zeros = torch.randint(0, 16, (19, 3), generator=torch.Generator().manual_seed(52)).double()
    w = ref.dequantize_int4(q, scales, zeros, 32)
    assert w[4, 40].item() == pytest.approx((q[4, 40].item() - zeros[4, 1].item()) * scales[4, 1].item())
    sym = ref.dequantize_int4(q, scales[:, :1], None, -1)
    assert sym[0, 95].item() == pytest.approx((q[0, 95].item() - 8) * scales[0, 0].item())


# --------------------------------------------------------------------------- error paths


def test_shape_errors_name_the_op() -> None:
    x = randn(3, 16, seed=60)
    with pytest.raises(ValueError, match="rms_norm"):
        ops.rms_norm(x, torch.ones(15), 1e-6)
    with pytest.raises(ValueError, match="rms_norm.*residual"):
        ops.rms_norm(x, torch.ones(16), 1e-6, residual=randn(2, 16, seed=61))
    with pytest.raises(ValueError, match="linear"):
        ops.linear(x, randn(8, 15, seed=62))
    with pytest.raises(ValueError, match="DenseLinear"):
        ops.DenseLinear(randn(8, 16, seed=63), bias=randn(7, seed=64))
    with pytest.raises(ValueError, match="silu_and_mul"):
        ops.silu_and_mul(randn(3, 15, seed=65))
    with pytest.raises(ValueError, match="embedding"):
        ops.embedding(torch.zeros(2, 3, dtype=torch.int64), randn(10, 4, seed=66))
    with pytest.raises(ValueError, match="argmax"):
        ops.argmax(randn(10, seed=67))
    q, k, v = _qkv(4, 9, 4, 2, 16, seed=68, dtype=torch.float32)
    with pytest.raises(ValueError, match="attention"):
        ops.attention(q[0], k, v, 0.25)
    with pytest.raises(ValueError, match="attention.*head dim"):
        ops.attention(q, k[..., :8], v[..., :8], 0.25)
    with pytest.raises(ValueError, match="attention.*multiple"):
        ops.attention(q[:, :3], k, v, 0.25)
    with pytest.raises(ValueError, match="attention.*cache slots"):
        ops.attention(q, k[:3], v[:3], 0.25)
    with pytest.raises(ValueError, match="attention.*tree mask"):
        ops.attention(q, k, v, 0.25, tree_mask=torch.zeros(4, 1, dtype=torch.int32))
    table = ops.build_rope_table(16, 10000.0, 32)
    with pytest.raises(ValueError, match="apply_rope"):
        ops.apply_rope(q, k[:4, :, :8], torch.arange(4), table)
    with pytest.raises(ValueError, match="apply_rope.*positions"):
        ops.apply_rope(q, k[:4], torch.arange(3), table)
    with pytest.raises(ValueError, match="apply_rope.*rotary dim"):
        ops.apply_rope(q[..., :8], k[:4, :, :8], torch.arange(4), table)
    with pytest.raises(ValueError, match="pack_tree_mask"):
        ops.pack_tree_mask(torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="words"):
        ops.unpack_tree_mask(torch.zeros(70, 1, dtype=torch.int64), 70)


def test_rope_config_errors() -> None:
    with pytest.raises(ValueError, match="even"):
        ops.build_rope_table(15, 10000.0, 8)
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        ops.build_rope_table(16, 10000.0, 8, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="longrope.*expected rotary_dim/2 = 8"):
        ops.build_rope_table(16, 10000.0, 8, {"rope_type": "longrope", "long_factor": [1.0] * 3,
                                              "short_factor": [1.0] * 3, "original_max_position_embeddings": 4})


@pytest.mark.parametrize("bad_id", [211, 10_000, -1])
def test_embedding_out_of_range_names_the_id(bad_id: int) -> None:
    with pytest.raises(IndexError, match=rf"token id {bad_id} is out of range for a vocabulary of 211"):
        ops.embedding(torch.tensor([3, bad_id, 5]), randn(211, 8, seed=70))


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,field", [
    (-0.1, 0, 1.0, 0.0, "temperature"), (math.nan, 0, 1.0, 0.0, "temperature"), (1.0, -1, 1.0, 0.0, "top_k"),
    (1.0, 0, 0.0, 0.0, "top_p"), (1.0, 0, 1.5, 0.0, "top_p"), (1.0, 0, math.nan, 0.0, "top_p"),
    (1.0, 0, 1.0, -0.1, "min_p"), (1.0, 0, 1.0, 1.5, "min_p"), (1.0, 0, 1.0, math.nan, "min_p")])
def test_bad_sampling_settings(temperature: float, top_k: int, top_p: float, min_p: float, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ops.validate_sampling(temperature, top_k, top_p, min_p)


@pytest.mark.parametrize("repetition,presence,frequency", [(1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.5, 0.0),
                                                       (1.0, 0.0, -0.8), (1.5, -1.0, 2.0)])
def test_apply_penalties_matches_oracle(repetition: float, presence: float, frequency: float) -> None:
    """Rows with histories of their own (as a draft tree's rows have): a prompt shared by all, an
    output that repeats tokens, some of them also in the prompt."""
    vocab = 97
    logits = 3 * randn(3, vocab, seed=44)
    prompt = [5, 9, 9, 40]
    outputs = [[], [9, 12, 12, 12, 60], [40, 3, 3, 96, 0]]
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[prompt] = True
    counts = torch.zeros(3, vocab, dtype=torch.int32)
    for row, out in enumerate(outputs):
        for t in out:
            counts[row, t] += 1
    got = ops.apply_penalties(logits, seen, counts, repetition, presence, frequency)
    assert got.dtype == torch.float32
    for row, out in enumerate(outputs):
        expected = ref.penalised_logits(logits[row], prompt, out, repetition, presence, frequency)
        torch.testing.assert_close(got[row].double(), expected, rtol=1e-6, atol=1e-6)
        untouched = [t for t in range(vocab) if t not in prompt and t not in out]
        assert torch.equal(got[row, untouched], logits[row, untouched])


@pytest.mark.parametrize("repetition,presence,frequency,field", [
    (0.0, 0.0, 0.0, "repetition_penalty"), (-1.0, 0.0, 0.0, "repetition_penalty"),
    (math.inf, 0.0, 0.0, "repetition_penalty"), (math.nan, 0.0, 0.0, "repetition_penalty"),
    (1.0, 2.5, 0.0, "presence_penalty"), (1.0, 0.0, -2.5, "frequency_penalty"), (1.0, 0.0, math.nan, "frequency")])
def test_bad_penalties(repetition: float, presence: float, frequency: float, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ops.validate_penalties(repetition, presence, frequency)


def test_logit_bias_vector() -> None:
    vec = ops.logit_bias_vector({3: 1.5, 0: -100.0, 9: 100}, 10, "cpu")
    assert vec.dtype == torch.float32 and vec.tolist() == [-100.0, 0, 0, 1.5, 0, 0, 0, 0, 0, 100.0]
    assert torch.equal(ops.logit_bias_vector({}, 4, "cpu"), torch.zeros(4))


@pytest.mark.parametrize("bias, vocab, message", [
    ({-1: 1.0}, None, r"keys must be token ids \(non-negative integers\), got -1"),
    ({"5": 1.0}, None, r"got '5'"), ({True: 1.0}, None, r"got True"),
    ({10: 1.0}, 10, r"keys must be token ids \(integers in \[0, 10\)\), got 10"),
    ({3: 100.5}, None, r"the bias of token 3 must be a number in \[-100, 100\], got 100.5"),
    ({3: math.nan}, None, r"got nan"), ({3: "1"}, None, r"got '1'")])
def test_bad_logit_bias(bias, vocab, message) -> None:
    with pytest.raises(ValueError, match=message):
        ops.validate_logit_bias(bias, vocab)


def test_logits_to_probs_rejects_greedy_temperature() -> None:
    with pytest.raises(ValueError, match="temperature > 0"):
        ops.logits_to_probs(randn(2, 10, seed=71), temperature=0.0)


def test_oracle_never_imports_edgespec() -> None:
    """The oracle is the independent side of every comparison: no module of it may import edgespec."""
    import ast
    from pathlib import Path

    files = sorted((Path(__file__).parent / "oracle").glob("*.py"))
    assert len(files) >= 4
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "edgespec" or n.startswith("edgespec.") for n in names), f"{f.name} imports {names}"
