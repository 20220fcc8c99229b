"""BlockFFN: the torch path (union of active experts) against the dense fp32 oracle, config and
checkpoint loading in both published layouts, and the sparsity statistics the engine and CLI report.
"""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from edgespec import LLM, ModelFormatError, ops
from edgespec.loading import load_model
from edgespec.models.blockffn import BlockFFN, ffn_settings_from_hf, write_random_blockffn
from edgespec.models.config import config_from_hf
from conftest import save_word_tokenizer
from kernel_checks import fake_view
from oracle.blockffn_ref import blockffn_ref, router_ref, routed_case as make_case, sparsity_ref

EPS = 1e-5


def run_op(x, router, norm, up, down):
    counters = torch.zeros(2, dtype=torch.int64)
    y = ops.blockffn(x, router, norm, EPS, up, down, counters)
    return y, counters


@pytest.mark.parametrize("t", [1, 7, 64, 128])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9, 0.95])
def test_torch_path_matches_dense_oracle(t: int, sparsity: float) -> None:
    e, d, h = 40, 16, 203
    x, router, norm, up, down, active = make_case(t, h, e, d, sparsity, seed=t * 100 + int(sparsity * 100))
    y, counters = run_op(x, router, norm, up, down)
    ref = blockffn_ref(x, router, norm, EPS, up, down)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    # The router's sparsity pattern is the constructed one, and the counters count it exactly.
    w = router_ref(x, router, norm, EPS)
    assert torch.equal(w != 0, active)
    tls, cls = sparsity_ref(w)
    assert cls == round(sparsity * e) / e
    assert counters.tolist() == [round((1 - tls) * t * e), round((1 - cls) * e)]


def test_inactive_experts_are_never_read() -> None:
    """Poison the weights of the step's inactive experts with NaN: the result must not change."""
    e, d, h, t = 24, 32, 128, 9
    x, router, norm, up, down, active = make_case(t, h, e, d, 0.75, seed=3)
    ref = blockffn_ref(x, router, norm, EPS, up, down)
    off = (~active.any(0)).nonzero().flatten()
    assert off.numel() == 18
    up, down = up.clone(), down.clone()
    for i in off.tolist():
        up[i * d:(i + 1) * d] = float("nan")
        down[:, i * d:(i + 1) * d] = float("nan")
    y, _ = run_op(x, router, norm, up, down)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_all_inactive_step_gives_zeros() -> None:
    x, router, norm, up, down, _ = make_case(5, 64, 12, 16, 1.0, seed=1)
    y, counters = run_op(x, router, norm, up, down)
    assert torch.equal(y, torch.zeros_like(y))
    assert counters.tolist() == [0, 0]
    assert torch.equal(ops.blockffn_router(x, router, norm, EPS), torch.zeros(5, 12))


def test_all_active_step_equals_dense_ffn() -> None:
    e, d, h, t = 12, 16, 64, 8
    x, router, norm, up, down, active = make_case(t, h, e, d, 0.0, seed=2, token_density=1.0)
    assert bool(active.all())
    y, counters = run_op(x, router, norm, up, down)
    w = router_ref(x, router, norm, EPS)
    dense = F.linear(F.silu(F.linear(x, up)) * w.repeat_interleave(d, dim=1), down)  # one dense FFN
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-6)
    assert counters.tolist() == [t * e, e]


def test_router_matches_oracle_and_zero_rows_stay_zero() -> None:
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(77, generator=g), dim=0)
    router = torch.randn(20, 77, generator=g) * 0.1 + u        # every router row points along u
    x = torch.randn(6, 77, generator=g)
    x[2] = -10.0 * u                                            # token 2: every logit negative
    norm = torch.rand(20, generator=g) + 0.5
    w = ops.blockffn_router(x, router, norm, EPS)
    torch.testing.assert_close(w, router_ref(x, router, norm, EPS), rtol=1e-5, atol=1e-6)
    assert torch.equal(w[2], torch.zeros(20))
    assert bool((w[[0, 1, 3, 4, 5]] != 0).any(dim=1).all())


@pytest.mark.parametrize("t", [1, 64])
def test_bf16_error_is_within_torch_bf16_error(t: int) -> None:
    """bf16 tolerance as STYLE.md: a few times the error of a plain bf16 torch computation."""
    e, d, h = 32, 32, 256
    x, router, norm, up, down, _ = make_case(t, h, e, d, 0.7, seed=11, dtype=torch.bfloat16)
    ref = blockffn_ref(x, router, norm, EPS, up, down)
    y, _ = run_op(x, router, norm, up, down)
    w = ops.blockffn_router(x, router, norm, EPS)
    plain = F.linear(F.silu(F.linear(x, up)) * w.repeat_interleave(d, dim=1), down)  # dense bf16
    plain_err = (plain.float() - ref).abs().max().item()
    err = (y.float() - ref).abs().max().item()
    assert y.dtype == torch.bfloat16
    assert err <= 3 * plain_err + 1e-3, (err, plain_err)


def test_bad_shapes_name_the_tensor() -> None:
    x, router, norm, up, down, _ = make_case(3, 64, 8, 16, 0.5)
    with pytest.raises(ValueError, match="down must be"):
        ops.blockffn(x, router, norm, EPS, up, down.T.contiguous())
    with pytest.raises(ValueError, match="router norm weight"):
        ops.blockffn(x, router, norm[:-1], EPS, up, down)
    with pytest.raises(ValueError, match="up must be"):
        ops.blockffn(x, router, norm, EPS, up[:-3], down)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.blockffn(x[None], router, norm, EPS, up, down)
    with pytest.raises(ValueError, match="counters must be int64"):
        ops.blockffn(x, router, norm, EPS, up, down, torch.zeros(2))
    with pytest.raises(ValueError, match="up is torch.float16"):
        ops.blockffn(x, router, norm, EPS, up.half(), down)


# ---- config and checkpoints -------------------------------------------------------------------

BLOCK_FIELDS = {"model_type": "minicpm", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "vocab_size": 100, "ffn_type": "block_linear", "num_experts": 8, "expert_size": 16,
                "router_act": "relu", "norm_after_router": "rms", "hidden_act": "silu"}


def test_config_maps_published_fields() -> None:
    cfg = config_from_hf(dict(BLOCK_FIELDS))
    assert cfg.ffn == {"type": "blockffn", "num_experts": 8, "expert_size": 16, "layout": "block_linear"}
    assert cfg.intermediate_size == 128  # absent: E * d
    assert config_from_hf({**BLOCK_FIELDS, "intermediate_size": 300}).intermediate_size == 300
    assert ffn_settings_from_hf({"ffn_type": "vanilla"}) is None
    assert config_from_hf({k: v for k, v in BLOCK_FIELDS.items() if k != "ffn_type"} | {"intermediate_size": 8}).ffn is None


@pytest.mark.parametrize("change, message", [
    ({"ffn_type": "moe"}, "ffn_type 'moe' is not supported"),
    ({"num_experts": 0}, "positive integer num_experts"),
    ({"expert_size": None}, "positive integer expert_size"),
    ({"router_act": "sigmoid"}, "router_act 'sigmoid'"),
    ({"norm_after_router": "sum"}, "norm_after_router 'sum'"),
    ({"norm_after_router": None}, "norm_after_router 'sum'"),  # absent means the config class default
    ({"attention_type": "mla"}, "attention_type 'mla'"),
])
def test_config_rejects_what_is_not_blockffn(change: dict, message: str) -> None:
    d = {**BLOCK_FIELDS, **change}
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ModelFormatError, match=message):
        config_from_hf(d, source="x/config.json")


def test_both_layouts_load_to_the_same_model(tmp_path: Path) -> None:
    a = write_random_blockffn(tmp_path / "lin", layout="block_linear", seed=5)
    b = write_random_blockffn(tmp_path / "blk", layout="block", seed=5)
    ma = load_model(str(a), device="cpu", dtype=torch.float32, with_tokenizer=False, max_context=64).model
    mb = load_model(str(b), device="cpu", dtype=torch.float32, with_tokenizer=False, max_context=64).model
    assert isinstance(ma.layers[0].ffn, BlockFFN)
    ids = torch.arange(3, 14)
    la = ma.logits(ma.forward(ids, torch.arange(11), ma.new_cache(), 0).hidden)
    lb = mb.logits(mb.forward(ids, torch.arange(11), mb.new_cache(), 0).hidden)
    assert torch.equal(la, lb)
    # The loaded layer against the oracle applied to the raw "block" tensors ([E, d, H], [E, H, d]).
    raw = load_file(str(b / "model.safetensors"))
    p = "model.layers.1.mlp."
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(0))
    ref = blockffn_ref(x, raw[p + "router_proj.weight"], raw[p + "router_norm.weight"], 1e-5,
                       raw[p + "up_proj"], raw[p + "down_proj"])
    torch.testing.assert_close(mb.layers[1].ffn(x), ref, rtol=1e-4, atol=1e-5)


def test_checkpoint_shape_errors_name_the_tensor(tmp_path: Path) -> None:
    d = write_random_blockffn(tmp_path / "m", num_experts=8, expert_size=16)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "expert_size": 8}))
    with pytest.raises(ModelFormatError, match=r"model\.layers\.0\.mlp\.up_proj has shape \(128, 96\)"):
        load_model(str(d), device="cpu", dtype=torch.float32, with_tokenizer=False)


# ---- statistics ---------------------------------------------------------------------------------

def test_decoder_stats_merge_layers_exactly(tmp_path: Path) -> None:
    """Decoder.stats() over one 7-token step equals the oracle's per-layer sparsity, averaged."""
    m = load_model(str(write_random_blockffn(tmp_path / "m", num_layers=3, seed=1)), device="cpu",
                   dtype=torch.float32, with_tokenizer=False, max_context=64).model
    seen: list[torch.Tensor] = []
    for layer in m.layers:
        ffn = layer.ffn

        def spy(x: torch.Tensor, ffn: BlockFFN = ffn) -> torch.Tensor:
            seen.append(router_ref(x, ffn.router_weight, ffn.router_norm, ffn.eps))
            return BlockFFN.__call__(ffn, x)

        layer.ffn = _Spy(ffn, spy)
    cache = m.new_cache()
    m.forward(torch.arange(5, 12), torch.arange(7), cache, 0)
    m.reset_stats()
    m.forward(torch.arange(20, 27), torch.arange(7, 14), cache, 7)
    stats = m.stats()
    per_layer = [sparsity_ref(w) for w in seen[-3:]]
    assert stats["blockffn_steps"] == 1 and stats["blockffn_tokens_per_step"] == 7
    assert stats["blockffn_token_sparsity"] == pytest.approx(sum(s[0] for s in per_layer) / 3, abs=1e-4)
    assert stats["blockffn_chunk_sparsity"] == pytest.approx(sum(s[1] for s in per_layer) / 3, abs=1e-4)
    assert 0 < stats["blockffn_chunk_sparsity"] < stats["blockffn_token_sparsity"] < 1


class _Spy:
    """Wraps a BlockFFN layer to observe its inputs while keeping its statistics interface."""

    def __init__(self, inner: BlockFFN, call) -> None:
        self.inner = inner
        self.call = call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x)

    def reset_stats(self) -> None:
        self.inner.reset_stats()

    @staticmethod
    def merge_stats(parts: list["_Spy"]) -> dict:
        return BlockFFN.merge_stats([p.inner for p in parts])


def test_generation_stats_and_cli_report_sparsity(tmp_path: Path) -> None:
    d = write_random_blockffn(tmp_path / "m", seed=2)
    save_word_tokenizer(d, 211)
    llm = LLM(load_model(str(d), device="cpu", dtype=torch.float32, max_context=128))
    result = llm.generate("w5 w9 w17 w30", max_new_tokens=12, ignore_eos=True)
    s = result.stats.as_dict()
    assert s["blockffn_steps"] == result.stats.steps == 11     # decode steps only: reset after prefill
    assert s["blockffn_tokens_per_step"] == 1.0
    # One token per step: an expert is inactive for the step exactly when the token does not use it.
    assert s["blockffn_token_sparsity"] == s["blockffn_chunk_sparsity"]
    assert 0.2 < s["blockffn_token_sparsity"] < 0.9

    from edgespec.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["generate", "--model", str(d), "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "6",
                   "--stats", "w5 w9 w17"])
    assert rc == 0
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert {"blockffn_token_sparsity", "blockffn_chunk_sparsity", "blockffn_steps"} <= set(line)
    assert 0.0 <= line["blockffn_chunk_sparsity"] <= line["blockffn_token_sparsity"] <= 1.0


def test_plain_mlp_models_report_no_sparsity(tiny_model_dir) -> None:
    m = load_model(str(tiny_model_dir("llama")), device="cpu", dtype=torch.float32, with_tokenizer=False,
                   max_context=32).model
    m.reset_stats()
    assert m.stats() == {}


# ---- kernel boundary (device-independent checks run on CPU tensors) ---------------------------

@pytest.mark.cpu_paths
def test_kernel_rejections_name_the_problem() -> None:
    from edgespec.ops import _kernels

    x, router, norm, up, down, _ = make_case(4, 64, 6, 32, 0.5, dtype=torch.bfloat16)
    reject = _kernels.blockffn_rejection
    assert "bfloat16 or float16" in reject(x.float(), router, norm, up, down)
    assert "router_weight has dtype" in reject(x, router.half(), norm, up, down)
    assert "1 <= T <= 128" in reject(torch.zeros(129, 64, dtype=torch.bfloat16), router, norm, up, down)
    x2, router2, norm2, up2, down2, _ = make_case(4, 80, 6, 32, 0.5, dtype=torch.bfloat16)
    assert "not a multiple of 32" in reject(x2, router2, norm2, up2, down2)
    x3, router3, norm3, up3, down3, _ = make_case(4, 64, 6, 16, 0.5, dtype=torch.bfloat16)
    assert "d a multiple of 32" in reject(x3, router3, norm3, up3, down3)
    assert "must be contiguous" in reject(x, router, norm, up, down.T.contiguous().T)
    assert "16-byte aligned rows" in reject(torch.zeros(4, 72, dtype=torch.bfloat16)[:, 4:68], router, norm, up, down)
    assert "not a CUDA device" in reject(x, router, norm, up, down)  # everything else is acceptable
    assert not _kernels.supports_blockffn(x, router, norm, up, down)


def test_kernel_split_factors_respect_the_launch_limits() -> None:
    # (They take no token count: a token's sums must not depend on the step's size.)
    from edgespec.ops import _kernels

    for hidden, experts, expert_size in [(32, 1, 32), (576, 36, 64), (2560, 80, 128), (4096, 1024, 32)]:
        for sms in (1, 46, 132):
            router, up, down = _kernels.blockffn_splits(hidden, experts, expert_size, sms)
            assert 1 <= router <= min(8, hidden // 32)
            assert 1 <= up <= min(4, hidden // 32)  # partial sums of [T, E*d] per split stay below the weights
            assert 1 <= down <= 8


_C = ops.compiled_module()


@pytest.mark.skipif(_C is None, reason="edgespec._C was not built (no CUDA compiler)")
def test_blockffn_rechecks_in_cpp() -> None:
    """The C++ entry point re-checks every view before any CUDA call (fake addresses, no GPU needed)."""
    def view(shape: tuple[int, ...], dtype: str = "bf16", slot: int = 0):
        return fake_view(_C, shape, dtype, slot)

    t, h, e, d = 4, 64, 6, 32
    good = dict(x=view((t, h)), router=view((e, h), slot=1), router_norm=view((e,), slot=2),
                up=view((e * d, h), slot=3), down=view((h, e * d), slot=4), out=view((t, h), slot=5),
                weights=view((t, e), "fp32", 6), active=view((e + 1,), "int32", 7), hidden=view((t, e * d), slot=8),
                partial=view((_C.blockffn_partial_floats(t, h, e, d, 1, 1, 1),), "fp32", 9),
                sync=view((_C.blockffn_sync_words(h, e, d),), "int32", 10), counters=None,
                router_splits=1, up_splits=1, down_splits=1, eps=1e-5, stream=0)

    def message(**change) -> str:
        with pytest.raises(RuntimeError) as info:
            _C.blockffn(**{**good, **change})
        return str(info.value)

    assert "down: dim 1 has size 160, expected 192" in message(down=view((h, e * d - 32), slot=4))
    assert "x: 200 tokens" in message(x=view((200, h)))
    assert "hidden overlaps up" in message(hidden=view((t, e * d), slot=3))
    assert "sync: dim 0 has size 3" in message(sync=view((3,), "int32", 10))
    assert "x: expected dtype in {bf16, fp16}" in message(x=view((t, h), "fp32"))
    assert message(router_splits=2).startswith("blockffn: invalid argument: partial: needs")
