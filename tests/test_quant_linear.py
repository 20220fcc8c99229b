"""QuantLinear and the W4A16 op on CPU (torch path): agreement with the dequantised oracle, fusion,
device/layout moves, the dequantised-weight cache, and quantized checkpoints (GPTQ, AWQ, GGUF Q4)
loaded end to end against a dense model holding the dequantised weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgespec import ops
from edgespec.ops import w4a16, w4a16_cpu
from edgespec.loading import load_model
from edgespec.ops.linear import ConcatLinear
from edgespec.ops.w4a16 import DEQUANT_BUDGET, W4A16Weight, w4a16_linear
from edgespec.quant import Int4Weight, QuantLinear, QuantSettings, quantize_rtn
from edgespec.quant import layout
from edgespec.quant.checkpoint import detect_quantized_checkpoint

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _random_int4(k: int, n: int, group: int, sym: bool, seed: int = 0, fractional_zeros: bool = False) -> Int4Weight:
    """Random 4-bit values and scales; zero points integers (GPTQ/AWQ) or, with fractional_zeros, any
    value in [0, 15) (GGUF Q4_1/Q4_K)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
    groups = -(-k // group)
    scales = torch.rand(groups, n, generator=g) * 0.05 + 0.01
    if sym:
        zeros = None
    elif fractional_zeros:
        zeros = torch.rand(groups, n, generator=g) * 15
    else:
        zeros = torch.randint(0, 16, (groups, n), generator=g).float()
    return Int4Weight(q, scales, zeros, group)


@pytest.mark.parametrize("k,n,group,sym", [(64, 64, 32, True), (96, 200, 32, False), (200, 96, 32, False),
                                           (576, 192, 128, False), (128, 64, 128, True), (40, 24, 40, False)])
@pytest.mark.parametrize("layout_name", ["plain", "tile", "cpu"])
def test_quant_linear_matches_oracle(k: int, n: int, group: int, sym: bool, layout_name: str) -> None:
    if layout_name == "tile" and not layout.tile_layout_ok(k, n):
        pytest.skip("shape has no tile layout")
    if layout_name == "cpu" and not (layout.cpu_layout_ok(k, n) and w4a16_cpu.available()):
        pytest.skip("shape has no cpu layout, or this torch no CPU int4 kernel")
    w = _random_int4(k, n, group, sym, seed=k + n)
    bias = torch.randn(n)
    if layout_name == "cpu":  # made by the loader's step for the CPU int4 kernel, from the plain layout
        lin = w.to_linear(bias)
        lin.weight = w4a16_cpu.prepare(lin.weight, torch.bfloat16)
    else:
        lin = w.to_linear(bias, layout_name=layout_name)
    assert lin.weight.layout == layout_name and (lin.in_features, lin.out_features) == (k, n)
    ref_w = w.dequantize()                         # oracle [N, K] fp32 from the format formula
    torch.testing.assert_close(lin.dequantize(), ref_w, rtol=0, atol=0)
    for rows in (1, 7, 33):
        x = torch.randn(rows, k)
        torch.testing.assert_close(lin(x), x @ ref_w.t() + bias, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout_name", ["plain", "tile", "cpu"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_dequantize_in_tiles_matches_oracle(monkeypatch: pytest.MonkeyPatch, layout_name: str, act_order: bool) -> None:
    """On the CPU dequantize() works through cache-sized tiles: with tiles of 64 x 64 here, a weight
    spans several in both directions, with a last partial group and tiles that start inside a packed
    word (plain: K = 200, groups of 36) and act-order columns scattered back. Bit for bit the format's
    formula in fp32, and rounded once."""
    monkeypatch.setattr(w4a16, "DEQUANT_TILE", 64 * 64)
    k, n, group = (200, 192, 36) if layout_name == "plain" else (256, 192, 64)
    w = _random_int4(k, n, group, sym=False, seed=31, fractional_zeros=True)
    if act_order:
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(32))
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[perm] = torch.arange(k) // group  # GPTQ's desc_act construction
        w = Int4Weight(w.q, w.scales, w.zeros, group, g_idx)
    if layout_name == "cpu":
        if not w4a16_cpu.available():
            pytest.skip("this torch has no CPU int4 kernel")
        lin = w.to_linear()
        lin.weight = w4a16_cpu.prepare(lin.weight, torch.bfloat16)
    else:
        lin = w.to_linear(layout_name=layout_name)
    assert lin.weight.layout == layout_name and (lin.weight.perm is not None) == act_order
    ref = w.dequantize()
    assert torch.equal(lin.dequantize(), ref)
    assert torch.equal(lin.dequantize(torch.bfloat16), ref.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quant_linear_half_precision(dtype: torch.dtype) -> None:
    """bf16/fp16 activations: within k x the rounding error torch itself makes at that precision."""
    w = _random_int4(256, 128, 64, sym=False, seed=1)
    lin = w.to_linear(device="cpu", dtype=dtype)
    x = torch.randn(5, 256)
    ref = x.double() @ w.dequantize().double().t()
    torch_err = ((x.to(dtype) @ w.dequantize().to(dtype).t()).double() - ref).abs().max()
    err = (lin(x.to(dtype)).double() - ref).abs().max()
    assert lin(x.to(dtype)).dtype == dtype
    assert err <= 4 * torch_err + 1e-3


def test_fuse_concatenates_outputs_in_both_layouts() -> None:
    parts = [_random_int4(128, n, 32, sym, seed=n) for n, sym in ((128, False), (64, True), (64, False))]
    x = torch.randn(3, 128)
    for name in ("plain", "tile"):
        lins = [p.to_linear(torch.randn(p.out_features), layout_name=name) for p in parts]
        fused = ops.fuse_linears(lins)
        assert isinstance(fused, QuantLinear) and fused.out_features == 256 and fused.weight.layout == name
        torch.testing.assert_close(fused(x), torch.cat([lin(x) for lin in lins], dim=-1), rtol=1e-5, atol=1e-5)


def test_fuse_falls_back_when_parts_disagree() -> None:
    a = _random_int4(128, 64, 32, sym=True).to_linear()
    b = _random_int4(128, 64, 64, sym=True).to_linear()  # other group size
    fused = QuantLinear.fuse([a, b])
    assert isinstance(fused, ConcatLinear)
    x = torch.randn(2, 128)
    torch.testing.assert_close(fused(x), torch.cat([a(x), b(x)], dim=-1))


def test_to_changes_dtype_and_layout() -> None:
    w = _random_int4(128, 128, 32, sym=False)
    lin = w.to_linear(layout_name="plain")
    tiled = lin.to(layout_name="tile")
    assert tiled.weight.layout == "tile" and torch.equal(tiled.ints(), lin.ints())
    half = lin.to(dtype=torch.bfloat16)
    assert half.weight.scales.dtype == torch.bfloat16 and half.weight.layout == "plain"  # CPU keeps plain


def test_dequant_cache_respects_budget(monkeypatch) -> None:
    w = _random_int4(64, 64, 32, sym=True).to_linear()
    x = torch.randn(2, 64)
    monkeypatch.setenv("EDGESPEC_W4A16_CACHE_MB", "0")
    w(x)
    assert w.weight._dense is None  # over budget: dequantised per call, nothing kept
    monkeypatch.setenv("EDGESPEC_W4A16_CACHE_MB", "64")
    before = DEQUANT_BUDGET.used.get("cpu", 0)
    y = w(x)
    assert w.weight._dense is not None and DEQUANT_BUDGET.used["cpu"] == before + 64 * 64 * 4
    torch.testing.assert_close(w(x), y)
    del w, y
    import gc

    gc.collect()
    assert DEQUANT_BUDGET.used["cpu"] == before  # released with the weight


def test_dequant_cache_leaves_the_gpus_activation_share_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the KV cache was planned into most of the memory the weights leave: a dequantised
    weight is kept only while GPU_KEEP_FREE bytes stay free beside it (else it is dequantised per
    call), whatever the budget allows, and never from inside a CUDA graph capture. (torch.cuda's
    memory query and capture state are stood in for: no GPU here.)"""
    monkeypatch.setenv("EDGESPEC_W4A16_CACHE_MB", "4096")
    gpu = torch.device("cuda")
    state = {"free": w4a16.GPU_KEEP_FREE + 300 * 2**20, "capturing": False}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    budget = w4a16._DequantBudget()
    assert budget.reserve(gpu, 200 * 2**20)
    state["free"] -= 200 * 2**20                       # the kept weight now takes that memory
    assert not budget.reserve(gpu, 200 * 2**20)        # would eat into the activations' share
    assert budget.reserve(gpu, 100 * 2**20)
    assert budget.used["cuda"] == 300 * 2**20
    state["free"] = 0
    assert budget.reserve(torch.device("cpu"), 200 * 2**20)  # host memory is not planned
    assert not w4a16._capturing(gpu)
    state["capturing"] = True
    assert w4a16._capturing(gpu) and not w4a16._capturing(torch.device("cpu"))


def test_dequant_cache_keeps_nothing_during_a_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight first met inside a CUDA graph capture is dequantised for that call only, and kept
    by the next call outside it (the capture is stood in for on a CPU weight)."""
    monkeypatch.setenv("EDGESPEC_W4A16_CACHE_MB", "64")
    w = _random_int4(64, 64, 32, sym=True).to_linear()
    x = torch.randn(2, 64)
    monkeypatch.setattr(w4a16, "_capturing", lambda device: True)
    y = w(x)
    assert w.weight._dense is None
    monkeypatch.setattr(w4a16, "_capturing", lambda device: False)
    torch.testing.assert_close(w(x), y)
    assert w.weight._dense is not None


def test_a_refused_weight_asks_again_only_when_something_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU every ask is a device memory query: a refusal is remembered until a kept weight is
    released or the limit changes."""
    asked = []
    reserve = DEQUANT_BUDGET.reserve
    monkeypatch.setattr(DEQUANT_BUDGET, "reserve", lambda device, nbytes: asked.append(nbytes) or reserve(device, nbytes))
    monkeypatch.setenv("EDGESPEC_W4A16_CACHE_MB", "0")
    w = _random_int4(64, 64, 32, sym=True).to_linear()
    x = torch.randn(2, 64)
    y = w(x)
    for _ in range(3):
        torch.testing.assert_close(w(x), y)
    assert len(asked) == 1 and w.weight._dense is None
    monkeypatch.setenv("EDGESPEC_W4A16_CACHE_MB", "0.001")  # a new limit (still too small): asks again
    w(x)
    w(x)
    assert len(asked) == 2
    DEQUANT_BUDGET.release("cpu", 0)                          # a kept weight freed: asks again
    w(x)
    assert len(asked) == 3
    monkeypatch.setenv("EDGESPEC_W4A16_CACHE_MB", "64")
    w(x)
    assert len(asked) == 4 and w.weight._dense is not None


def test_w4a16_bad_inputs() -> None:
    lin = _random_int4(64, 64, 32, sym=True).to_linear()
    with pytest.raises(ValueError, match="x has 32 input features but the weight expects 64"):
        lin(torch.randn(2, 32))
    with pytest.raises(TypeError, match="float tensor"):
        lin(torch.ones(2, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="bias shape"):
        w4a16_linear(torch.randn(1, 64), lin.weight, torch.randn(3))
    with pytest.raises(ValueError, match=r"plain qweight must be int32 \[8, 64\]"):
        W4A16Weight(torch.zeros(4, 64, dtype=torch.int32), torch.ones(2, 64), None, 32, 64, 64)
    with pytest.raises(ValueError, match=r"scales must be float \[2, 64\]"):
        W4A16Weight(torch.zeros(8, 64, dtype=torch.int32), torch.ones(3, 64), None, 32, 64, 64)
    with pytest.raises(ValueError, match="4-bit values must be 0..15"):
        QuantLinear.from_ints(torch.full((8, 8), 16, dtype=torch.uint8), torch.ones(1, 8), None, 8)


# ---------------------------------------------------------------- checkpoints end to end

def _hf_dequantised_logits(src: Path, weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the transformers model at `src` with the given projection weights swapped in."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        for prefix, w in weights.items():
            model.get_submodule(prefix).weight.copy_(w)
        return model(tokens[None]).logits[0]


def _edgespec_logits(path: Path, tokens: torch.Tensor, **kw) -> tuple[torch.Tensor, object]:
    m = load_model(path, device="cpu", dtype=torch.float32, max_context=64, with_tokenizer=False, **kw).model
    with torch.no_grad():
        out = m.forward(tokens, torch.arange(tokens.numel()), m.new_cache(64), 0)
        return m.logits(out.hidden), m


def _projections(cfg: dict) -> list[str]:
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return [f"model.layers.{i}.{n}" for i in range(cfg["num_hidden_layers"]) for n in names]


def _write_checkpoint(src: Path, dst: Path, quant_tensors: dict[str, torch.Tensor], qconfig: dict) -> None:
    from safetensors.torch import load_file, save_file

    replaced = {k.removesuffix(".qweight") + ".weight" for k in quant_tensors if k.endswith(".qweight")}
    tensors = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if k not in replaced}
    tensors.update(quant_tensors)
    dst.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (dst / "config.json").write_text(json.dumps(cfg))


def test_awq_checkpoint_matches_dequantised_model(tiny_model_dir, tmp_path) -> None:
    from safetensors.torch import load_file

    src = tiny_model_dir("qwen2", seed=3, intermediate_size=192)  # qwen2: q/k/v biases
    cfg = json.loads((src / "config.json").read_text())
    dense = load_file(str(src / "model.safetensors"))
    quant, deq = {}, {}
    for p in _projections(cfg):
        w = quantize_rtn(dense[p + ".weight"].float(), QuantSettings("rtn", 32, sym=False, min_zero=0))
        deq[p] = w.dequantize()
        # AWQ gemm packing, written here from the spec: nibble i of word c holds column 8c + order[i].
        for name, ints in (("qweight", w.q), ("qzeros", w.zeros.to(torch.uint8))):
            arr = ints.numpy().astype(np.uint64)
            words = np.zeros((arr.shape[0], arr.shape[1] // 8), dtype=np.uint64)
            for c in range(arr.shape[1] // 8):
                for i in range(8):
                    words[:, c] |= arr[:, 8 * c + AWQ_ORDER[i]] << np.uint64(4 * i)
            quant[f"{p}.{name}"] = torch.from_numpy(words.astype(np.uint32).view(np.int32))
        quant[p + ".scales"] = w.scales.half()  # exact: the quantizer rounds scales to fp16
    dst = tmp_path / "awq"
    _write_checkpoint(src, dst, quant, {"quant_method": "awq", "bits": 4, "group_size": 32,
                                        "zero_point": True, "version": "gemm"})
    tokens = torch.tensor([5, 17, 99, 3, 150, 42, 7])
    ours, model = _edgespec_logits(dst, tokens)
    assert isinstance(model.layers[0].qkv, QuantLinear) and model.layers[0].qkv.bias is not None
    ref = _hf_dequantised_logits(src, deq, tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_quantized_checkpoint_detection_errors(tmp_path) -> None:
    from edgespec.errors import ModelFormatError

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="quant_method 'bitsandbytes' is not supported"):
        detect_quantized_checkpoint(tmp_path, {"quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(ModelFormatError, match="8-bit weights are not supported"):
        detect_quantized_checkpoint(tmp_path, {"quantization_config": {"quant_method": "gptq", "bits": 8}})
    with pytest.raises(ModelFormatError, match="AWQ version 'gemv' is not supported"):
        detect_quantized_checkpoint(tmp_path, {"quantization_config": {"quant_method": "awq", "version": "gemv"}})
    assert detect_quantized_checkpoint(tmp_path, {"model_type": "llama"}) is None


@pytest.mark.slow
def test_gguf_q4_direct_import_matches_dequantised_load(demo_gguf, demo_llm) -> None:
    """Q4_1 blocks become QuantLinears without a float round trip; the model computes what the
    dequantised model computes (which also checks the llama Q/K row un-permutation)."""
    tokens = torch.tensor([1, 504, 3458, 314, 260, 1345, 30, 2])
    ours, model = _edgespec_logits(demo_gguf, tokens, quantized=True)
    layer = model.layers[0]
    assert isinstance(layer.qkv, QuantLinear) and layer.qkv.out_features == 576 + 2 * 192
    assert isinstance(layer.ffn.gate_up, QuantLinear) and layer.qkv.group_size == 32
    dense = demo_llm.model
    with torch.no_grad():
        ref = dense.logits(dense.forward(tokens, torch.arange(tokens.numel()), dense.new_cache(64), 0).hidden)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.cpu_paths
def test_kernel_constraints_are_stated_and_fall_back() -> None:
    """The CUDA kernel's predicate names why it refuses a weight (checked before any device test,
    so on CPU tensors); the op then takes the torch path."""
    from edgespec.ops import _kernels

    def lin(k: int, n: int, group: int, layout_name: str = "tile", dtype=torch.bfloat16) -> QuantLinear:
        return _random_int4(k, n, group, sym=False).to_linear(dtype=dtype, layout_name=layout_name)

    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert "bfloat16 or float16" in _kernels.w4a16_rejection(x.float(), lin(128, 64, 32, dtype=torch.float32).weight)
    assert "plain layout" in _kernels.w4a16_rejection(x, lin(128, 64, 32, "plain").weight)
    assert "group size 48" in _kernels.w4a16_rejection(x, lin(128, 64, 48).weight)
    assert "not a CUDA device" in _kernels.w4a16_rejection(x, lin(128, 64, 32).weight)  # all else fine
    big = torch.randn(_kernels.W4A16_MAX_CHUNKED_ROWS + 1, 128, dtype=torch.bfloat16)
    assert "dequantise + cuBLAS" in _kernels.w4a16_rejection(big, lin(128, 64, 32).weight)
    mixed = lin(128, 64, 32)
    assert "scales has dtype torch.float32" in _kernels.w4a16_rejection(x, mixed.to(dtype=torch.float32, layout_name="tile").weight)
    # Per-channel weights are taken whatever K is (one group).
    assert "not a CUDA device" in _kernels.w4a16_rejection(torch.randn(1, 80, dtype=torch.bfloat16),
                                                           lin(80, 64, 80).weight)
