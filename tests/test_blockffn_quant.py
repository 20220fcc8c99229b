"""BlockFFN with 4-bit experts on the CPU: the op's torch path against the dense oracle, the
4-bit kernel path's rejections, `edgespec quantize` (RTN and GPTQ) writing BlockFFN checkpoints
that load back with 4-bit experts, and the speculative invariant on such a model.

The kernels themselves are tested in test_blockffn_w4a16_kernels.py (emulator and GPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from edgespec import LLM, ops
from edgespec.loading import LoadedModel, load_model
from edgespec.models.blockffn import BlockFFN, write_random_blockffn
from edgespec.ops import _kernels
from edgespec.quant import QuantSettings, quantize_checkpoint, quantize_decoder, quantize_rtn, quantized_copy
from conftest import save_word_tokenizer
from kernel_checks import fake_view
from oracle.blockffn_ref import blockffn_ref, routed_case, sparsity_ref
from w4a16_cases import _weight as random_int4, random_experts

EPS = 1e-5
spec = pytest.importorskip("edgespec.spec", reason="the speculative decoding package is not available")


@pytest.mark.parametrize("t", [1, 7, 64, 128])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_torch_path_with_4bit_experts_matches_oracle(t: int, sparsity: float) -> None:
    e, d, h = 20, 32, 160
    x, router, norm, _, _, active = routed_case(t, h, e, d, sparsity, seed=t + int(100 * sparsity),
                                                token_density=1.0 if sparsity == 0.0 else 0.5)
    up, down = random_experts(h, e, d, 32, layout="plain", act_order=t == 7)
    counters = torch.zeros(2, dtype=torch.int64)
    y = ops.blockffn(x, router, norm, EPS, up, down, counters)
    ref = blockffn_ref(x, router, norm, EPS, up.dequantize(), down.dequantize())
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    tls, cls = sparsity_ref(active.float())
    assert counters.tolist() == [round((1 - tls) * t * e), round((1 - cls) * e)]


@pytest.mark.parametrize("layout", ["plain", "tile"])
def test_sub_weights_dequantise_to_the_slices(layout: str) -> None:
    """W4A16Weight.sub cuts packed storage without a copy; a cut the packing cannot make is None."""
    k, n = 256, 384
    for group in (32, 128, -1):
        w = random_int4(k, n, group, "int", seed=group).to_linear(None, "cpu", torch.float32, layout_name=layout).weight
        full = w.dequantize()
        for outputs in [(0, 64), (128, 384), (64, 128)]:
            part = w.sub(outputs=outputs)
            assert part is not None and part.qweight.data_ptr() >= w.qweight.data_ptr()
            assert torch.equal(part.dequantize(), full[outputs[0]:outputs[1]])
        for inputs in [] if group == -1 else [(0, 128), (128, 256)] + ([(32, 64)] if group == 32 else []):
            part = w.sub(inputs=inputs)
            assert part is not None, (group, inputs)
            assert torch.equal(part.dequantize(), full[:, inputs[0]:inputs[1]])
        assert w.sub(inputs=(0, k), outputs=(0, n)) is not None
        if group == -1:  # one group of scales over all of K: no input cut but the whole
            assert w.sub(inputs=(0, 128)) is None
    w = random_int4(k, n, 32, "int", seed=1).to_linear(None, "cpu", torch.float32, layout_name=layout).weight
    assert (w.sub(outputs=(0, 32)) is None) == (layout == "tile")  # tiles are 64 columns wide
    assert w.sub(inputs=(4, 36)) is None and w.sub(inputs=(0, 300)) is None
    act = random_int4(k, n, 32, "int", seed=2, g_idx=True).to_linear(None, "cpu", torch.float32, layout_name=layout)
    assert act.weight.perm is not None and act.weight.sub(outputs=(0, 64)) is None


@pytest.mark.parametrize("act_order", [False, True])
def test_uncached_4bit_experts_dequantise_only_the_active_ones(act_order: bool, monkeypatch) -> None:
    """With no room to cache the dequantised experts, the torch path dequantises each active run
    of experts alone (act-order up: the whole weight, which sub cannot cut) and still matches the
    oracle."""
    from edgespec.ops import w4a16

    monkeypatch.setenv("EDGESPEC_W4A16_CACHE_MB", "0")
    e, d, h, t = 16, 32, 96, 3
    x, router, norm, _, _, active = routed_case(t, h, e, d, 0.75, seed=4)
    up, down = random_experts(h, e, d, 32, layout="plain", act_order=act_order)
    sizes = []
    real = w4a16.W4A16Weight.dequantize
    monkeypatch.setattr(w4a16.W4A16Weight, "dequantize",
                        lambda self, dtype=torch.float32: sizes.append(self.out_features * self.in_features)
                        or real(self, dtype))
    y = ops.blockffn(x, router, norm, EPS, up, down)
    assert up._dense is None and down._dense is None
    monkeypatch.setattr(w4a16.W4A16Weight, "dequantize", real)
    torch.testing.assert_close(y, blockffn_ref(x, router, norm, EPS, up.dequantize(), down.dequantize()),
                               rtol=1e-4, atol=1e-5)
    active_experts = int(active.any(0).sum())
    whole = e * d * h
    expected_down = active_experts * d * h
    assert sum(sizes) == (whole if act_order else active_experts * d * h) + expected_down


def test_mixed_dense_and_4bit_experts() -> None:
    """Each projection may be dense or 4-bit on its own (the op dequantises what is 4-bit)."""
    e, d, h, t = 8, 32, 64, 5
    x, router, norm, up_dense, _, _ = routed_case(t, h, e, d, 0.5, seed=3)
    _, down = random_experts(h, e, d, 32, layout="plain")
    y = ops.blockffn(x, router, norm, EPS, up_dense, down)
    torch.testing.assert_close(y, blockffn_ref(x, router, norm, EPS, up_dense, down.dequantize()),
                               rtol=1e-4, atol=1e-5)


def test_bad_4bit_expert_shapes_name_the_tensor() -> None:
    x, router, norm, _, _, _ = routed_case(3, 64, 8, 32, 0.5)
    up, down = random_experts(64, 8, 32, 32, layout="plain")
    wrong_up, _ = random_experts(64, 8, 16, 32, layout="plain")
    with pytest.raises(ValueError, match=r"down must be \[64, 128\] \(H, E \* d\), got \(64, 256\)"):
        ops.blockffn(x, router, norm, EPS, wrong_up, down)
    with pytest.raises(ValueError, match="up must be"):
        ops.blockffn(x, router, norm, EPS, down, down)
    meta_up = ops.W4A16Weight(up.qweight.to("meta"), up.scales.to("meta"), None, up.group_size, up.in_features,
                              up.out_features)
    with pytest.raises(ValueError, match=r"up is torch.float32 on meta, expected x's torch.float32 on cpu"):
        ops.blockffn(x, router, norm, EPS, meta_up, down)


def test_4bit_kernel_rejections_name_the_problem() -> None:
    """Device-independent checks of the 4-bit kernel path (CPU tensors: 'not a CUDA device' last)."""
    reject = _kernels.blockffn_w4a16_rejection
    bf16 = torch.bfloat16
    x, router, norm, _, _, _ = routed_case(4, 128, 6, 64, 0.5)
    x, router, norm = (v.to(bf16) for v in (x, router, norm))
    up, down = random_experts(128, 6, 64, 32, dtype=bf16)
    assert "not a CUDA device" in reject(x, router, norm, up, down)  # everything else is acceptable
    assert "plain layout" in reject(x, router, norm, *random_experts(128, 6, 64, 32, dtype=bf16, layout="plain"))
    assert "bfloat16 or float16" in reject(x.float(), router.float(), norm.float(), up, down)
    fp16_experts = random_experts(128, 6, 64, 32, dtype=torch.float16)
    assert "scales has dtype torch.float16" in reject(x, router, norm, *fp16_experts)
    x2, router2, norm2, _, _, _ = routed_case(4, 128, 4, 32, 0.5)
    x2, router2, norm2 = (v.to(bf16) for v in (x2, router2, norm2))
    assert "expert size 32 is not a multiple of 64" in reject(x2, router2, norm2,
                                                              *random_experts(128, 4, 32, 32, dtype=bf16))
    up128, down128 = random_experts(128, 6, 64, 128, dtype=bf16)
    assert "down's group size 128 does not divide the expert size 64" in reject(x, router, norm, up128, down128)
    act_up, _ = random_experts(128, 6, 64, 32, dtype=bf16, act_order=True)
    assert act_up.perm is not None and "not a CUDA device" in reject(x, router, norm, act_up, down)
    _, act_down = random_experts(128, 6, 64, 32, dtype=bf16)
    act_down.perm = torch.randperm(6 * 64)
    assert "down is act-order" in reject(x, router, norm, up, act_down)
    x3, router3, norm3, _, _, _ = routed_case(4, 96, 6, 64, 0.5)
    x3, router3, norm3 = (v.to(bf16) for v in (x3, router3, norm3))
    plain_96 = random_experts(96, 6, 64, 32, dtype=bf16, layout="plain")  # N = 96: no tile layout
    assert "hidden size 96 is not a multiple of 64" in reject(x3, router3, norm3, *plain_96)
    assert "must map H = 128 -> E * d -> H" in reject(x, router, norm, down, up)


# ---- quantizing and loading BlockFFN models --------------------------------------------------------

def _load(directory: Path, dtype: torch.dtype = torch.float32):
    return load_model(str(directory), device="cpu", dtype=dtype, with_tokenizer=False, max_context=256).model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.logits(model.forward(ids, torch.arange(ids.numel()), model.new_cache(), 0).hidden)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_writes_a_4bit_blockffn_checkpoint(tmp_path: Path, method: str) -> None:
    """`edgespec quantize` on a BlockFFN model ("block" layout on disk): the experts become GPTQ
    tensors of the block_linear shapes, the router stays dense, and the checkpoint loads back with
    W4A16Weight experts holding exactly the weights quantize_decoder computes."""
    src = write_random_blockffn(tmp_path / "dense", layout="block", num_layers=2, num_experts=8, expert_size=32,
                                seed=3)
    save_word_tokenizer(src, 211)
    settings = QuantSettings(method=method, group_size=32, act_order=method == "gptq")
    text = " ".join(f"w{(i * 37) % 208 + 3}" for i in range(600))
    out = quantize_checkpoint(src, tmp_path / "q4", settings, calibration_text=text if method == "gptq" else None,
                              calibration_tokens=512, seq_len=128, progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["ffn_type"] == "block_linear" and config["quantization_config"]["bits"] == 4
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        p = "model.layers.1.mlp."
        assert {p + "up_proj.qweight", p + "down_proj.qweight", p + "router_proj.weight"} <= names
        assert p + "up_proj" not in names and p + "down_proj" not in names
        assert tuple(f.get_tensor(p + "up_proj.qweight").shape) == (96 // 8, 8 * 32)      # [H/8, E*d]
        assert tuple(f.get_tensor(p + "down_proj.qweight").shape) == (8 * 32 // 8, 96)    # [E*d/8, H]
        if method == "gptq":  # act-order on up only: down keeps the experts' rows in blocks
            assert not torch.equal(f.get_tensor(p + "up_proj.g_idx"), torch.arange(96, dtype=torch.int32) // 32)
            assert torch.equal(f.get_tensor(p + "down_proj.g_idx"), torch.arange(256, dtype=torch.int32) // 32)

    loaded = _load(out)
    ffn = loaded.layers[0].ffn
    assert isinstance(ffn, BlockFFN) and ffn.quantized
    assert isinstance(ffn.up, ops.W4A16Weight) and isinstance(ffn.down, ops.W4A16Weight)
    assert isinstance(ffn.router_weight, torch.Tensor)

    # Exactly the weights quantize_decoder computes on the same calibration tokens.
    dense = _load(src)
    batches = []
    if method == "gptq":
        from edgespec.loading import Tokenizer
        from edgespec.quant.quantizer import calibration_batches

        batches = calibration_batches(Tokenizer.from_pretrained(src).encode(text), 128, 512)
    expected = quantized_copy(dense, quantize_decoder(dense, settings, batches))
    for got, want in zip(loaded.layers, expected.layers):
        for name in ("up", "down"):
            assert torch.equal(getattr(got.ffn, name).dequantize(), getattr(want.ffn, name).dequantize()), name
        for name in ("qkv", "o"):
            assert torch.equal(getattr(got, name).dequantize(), getattr(want, name).dequantize()), name
        # What stays dense is stored in fp16 (as for every GPTQ checkpoint).
        assert torch.equal(got.ffn.router_weight, want.ffn.router_weight.half().float())
    ids = torch.arange(3, 40)
    a, b = _logits(loaded, ids), _logits(expected, ids)
    assert (a - b).norm() < 0.01 * b.norm()  # fp16 rounding of the dense parts only
    # The 4-bit experts stay close to the dense ones: about the 10% error of 4-bit weights.
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
    for q_layer, d_layer in zip(loaded.layers, dense.layers):
        y, y_ref = q_layer.ffn(x), d_layer.ffn(x)
        assert 0 < (y - y_ref).norm() < 0.2 * y_ref.norm()


def test_malformed_4bit_blockffn_checkpoints_name_the_tensor(tmp_path: Path) -> None:
    """A config that disagrees with the 4-bit expert tensors, or an expert whose scales are
    missing, is a ModelFormatError naming the tensor and what was expected."""
    from safetensors.torch import load_file, save_file

    from edgespec import ModelFormatError

    src = write_random_blockffn(tmp_path / "dense", num_layers=1, num_experts=4, expert_size=32, seed=2)
    out = quantize_checkpoint(src, tmp_path / "q4", QuantSettings(method="rtn", group_size=32), progress=False)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "expert_size": 16, "intermediate_size": 64}))
    with pytest.raises(ModelFormatError, match=r"mlp\.up_proj is a 4-bit weight of 96 inputs and 128 outputs, "
                                               r"expected 96 -> 64"):
        _load(out)
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.0.mlp.down_proj.scales"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match=r"model\.layers\.0\.mlp\.down_proj\.qweight has no "
                                               r"model\.layers\.0\.mlp\.down_proj\.scales"):
        _load(out)


def test_gptq_beats_rtn_on_a_blockffn_model(tmp_path: Path) -> None:
    """GPTQ's Hessians for the experts (up: the FFN input; down: the router-scaled hidden state)
    must pay off: lower logit error than round-to-nearest at the same group size."""
    src = write_random_blockffn(tmp_path / "dense", num_layers=2, num_experts=8, expert_size=32, seed=6)
    model = _load(src)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 211, (128,), generator=g) for _ in range(4)]
    ids = torch.randint(3, 211, (64,), generator=g)
    ref = _logits(model, ids)
    errors = {}
    for method in ("rtn", "gptq"):
        settings = QuantSettings(method=method, group_size=32)
        q = quantized_copy(model, quantize_decoder(model, settings, calib if method == "gptq" else ()))
        errors[method] = (_logits(q, ids) - ref).pow(2).mean().item()
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_quantized_blockffn_speculative_equals_plain(tmp_path: Path) -> None:
    """The speculative invariant on a model with 4-bit experts: a verified tree is one BlockFFN step
    over dequantised experts, and greedy output equals plain greedy output token for token."""
    src = write_random_blockffn(tmp_path / "dense", num_layers=2, num_experts=16, expert_size=32, seed=4)
    weights = quantize_decoder(_load(src), QuantSettings(method="rtn", group_size=32))
    target = quantized_copy(_load(src), weights)
    llm = LLM(LoadedModel(target, None, "quantized-blockffn"))
    prompt = [5, 17, 23, 42, 8, 99, 150, 3]
    plain = llm.generate(prompt, max_new_tokens=24, ignore_eos=True)
    spec.enable_speculation(llm, draft=spec.ModelDrafter(_load(src), name="dense-draft"), tree_size=12, depth=4,
                            topk=3)
    fast = llm.generate(prompt, max_new_tokens=24, ignore_eos=True)
    assert fast.token_ids == plain.token_ids
    assert fast.stats.extra["blockffn_tokens_per_step"] > 1.0
    assert fast.stats.extra["mean_accepted_length"] > 1.0


def test_rtn_experts_reproduce_quantize_rtn(tmp_path: Path) -> None:
    """The experts quantize_decoder returns for a BlockFFN layer are RTN of the layer's up/down."""
    model = _load(write_random_blockffn(tmp_path / "m", num_layers=1, num_experts=4, expert_size=32, seed=1))
    settings = QuantSettings(method="rtn", group_size=32, sym=True)
    weights = quantize_decoder(model, settings)
    ffn = model.layers[0].ffn
    for name, dense in (("up_proj", ffn.up), ("down_proj", ffn.down)):
        expected = quantize_rtn(dense.float(), settings)
        got = weights[f"model.layers.0.mlp.{name}"]
        assert torch.equal(got.q, expected.q) and torch.equal(got.scales, expected.scales)


_C = ops.compiled_module()


@pytest.mark.skipif(_C is None, reason="edgespec._C was not built (no CUDA compiler)")
def test_4bit_entry_points_recheck_in_cpp() -> None:
    """blockffn_router and the W4A16 expert gather re-check their views in C++ before any CUDA call
    (fake addresses, no GPU needed)."""
    def view(shape: tuple[int, ...], dtype: str = "bf16", slot: int = 0):
        return fake_view(_C, shape, dtype, slot)

    t, h, e, d = 4, 128, 6, 64
    router = dict(x=view((t, h)), router=view((e, h), slot=1), router_norm=view((e,), slot=2),
                  weights=view((t, e), "fp32", 3), active=view((e + 1,), "int32", 4),
                  partial=view((t * e,), "fp32", 5), sync=view((1,), "int32", 6), counters=None, router_splits=1,
                  eps=1e-5, stream=0)

    def router_error(**change) -> str:
        with pytest.raises(RuntimeError) as info:
            _C.blockffn_router(**{**router, **change})
        return str(info.value)

    assert "active: dim 0 has size 6, expected 7" in router_error(active=view((e,), "int32", 4))
    assert "partial: needs 48 contiguous floats" in router_error(router_splits=2)
    assert "weights overlaps x" in router_error(weights=view((t, e), "fp32", 0))
    assert "sync: dim 0 has size 2" in router_error(sync=view((2,), "int32", 6))

    # up: K = H, N = E * d, gathering columns; down: K = E * d, N = H, gathering rows.
    up = dict(x=view((t, h)), qweight=view((h // 16, 2 * e * d), "int32", 1), scales=view((h // 32, e * d), slot=2),
              zeros=None, bias=None, out=view((t, e * d), slot=3), partial=None, counters=None, group_size=32,
              splits=1, stream=0, active=view((e + 1,), "int32", 4), expert_weights=view((t, e), "fp32", 5),
              expert_size=d, gather_rows=False)
    down = dict(up, x=view((t, e * d)), qweight=view((e * d // 16, 2 * h), "int32", 1),
                scales=view((e * d // 32, h), slot=2), out=view((t, h), slot=3), expert_weights=None, gather_rows=True)

    def gemm_error(base: dict, **change) -> str:
        with pytest.raises(RuntimeError) as info:
            _C.w4a16_gemm(**{**base, **change})
        return str(info.value)

    assert "do not make the N = 384" in gemm_error(up, expert_size=32)
    assert "gathering columns needs a multiple of 64" in gemm_error(
        up, expert_size=32, active=view((2 * e + 1,), "int32", 4), expert_weights=view((t, 2 * e), "fp32", 5))
    assert "the columns gather needs the router weights" in gemm_error(up, expert_weights=None)
    assert "expert_weights: dim 1 has size 5" in gemm_error(up, expert_weights=view((t, e - 1), "fp32", 5))
    assert "out overlaps active" in gemm_error(up, active=view((e + 1,), "int32", 3))
    assert "the expert gather takes none" in gemm_error(down, bias=view((h,), slot=6))
    assert "does not divide expert_size 64" in gemm_error(down, group_size=128, scales=view((e * d // 128, h), slot=2))
    assert "only the columns gather scales by them" in gemm_error(down, expert_weights=view((t, e), "fp32", 5))
    assert "given without an active expert list" in gemm_error(up, active=None)
