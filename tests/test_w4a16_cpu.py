"""W4A16 on the CPU through torch's int4 kernel (edgespec/ops/w4a16_cpu.py): agreement with the
dequantised oracle, a row's result independent of the row count (what keeps speculative == plain
for 4-bit models on the CPU), the shapes and dtypes it refuses (which take the dequantised path),
and the demo model loading 4-bit on the CPU by default."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import edgespec
from edgespec.ops import w4a16_cpu
from edgespec.ops.linear import INVARIANT_ROWS
from edgespec.quant import Int4Weight, QuantLinear, layout
from edgespec.quant.checkpoint import gguf_q4_by_default
from test_quant_linear import _random_int4

pytestmark = [
    pytest.mark.cpu_paths,
    pytest.mark.skipif(not w4a16_cpu.available(), reason="this torch has no CPU int4 kernel"),
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weight(k: int, n: int, group: int, sym: bool, seed: int = 0) -> Int4Weight:
    return _random_int4(k, n, group, sym, seed, fractional_zeros=True)  # GGUF-like zero points


def _linear(w: Int4Weight, **kwargs) -> QuantLinear:
    return w.to_linear(dtype=torch.bfloat16, **kwargs)


def _bf16_bound(x: torch.Tensor, w_ref: torch.Tensor, ref: torch.Tensor) -> float:
    """What a dense bf16 matmul of the same weight gets wrong: the yardstick of the int4 path."""
    dense = (x.to(torch.bfloat16) @ w_ref.to(torch.bfloat16).t()).double()
    return float((dense - ref).abs().max())


@pytest.mark.parametrize("k,n,group,sym", [
    (576, 960, 32, False),     # SmolLM2 q|k|v, GGUF Q4_1-style groups
    (1536, 576, 64, True),     # SmolLM2 down
    (576, 192, 128, False),    # a group 128 that does not tile K = 576: runs as groups of 64
    (320, 48, 320, False),     # per-channel scales: groups of 64
    (2048, 64, 1024, True),    # a coarse group: groups of 256
    (96, 16, 32, False),       # the smallest N
])
def test_matches_dequantised_oracle(k: int, n: int, group: int, sym: bool) -> None:
    w = _weight(k, n, group, sym, seed=k + n)
    bias = torch.randn(n)
    lin = _linear(w, bias=bias)
    w_ref = lin.dequantize().double()            # [N, K]: the stored (bf16) scales and zeros, in fp32
    gen = torch.Generator().manual_seed(k * n)
    for rows in (1, 5, 33):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        y = lin(x)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
        ref = x.double() @ w_ref.t() + bias.to(torch.bfloat16).double()
        err = float((y.double() - ref).abs().max())
        # The kernel also rounds each group's offset (8 - z) * s to bf16: up to ~2x a dense bf16
        # matmul's error over 100 random inputs per shape, never 3x.
        assert err <= 3 * _bf16_bound(x, w_ref, ref - bias.to(torch.bfloat16).double()) + 1e-2, (rows, err)
    assert lin.weight._cpu_int4 is not None and lin.weight._dense is None  # the int4 path ran, nothing dequantised


def test_act_order_gathers_the_input_columns() -> None:
    k, n, group = 256, 64, 64
    w = _weight(k, n, group, sym=False, seed=3)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(4))
    lin = QuantLinear.from_ints(w.q, w.scales, w.zeros, group, perm=perm, dtype=torch.bfloat16)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    ref = x.double() @ lin.dequantize().double().t()                 # dequantize() undoes perm
    assert float((lin(x).double() - ref).abs().max()) <= 3 * _bf16_bound(x, lin.dequantize().double(), ref) + 1e-2
    assert lin.weight._cpu_int4 is not None


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_result_does_not_depend_on_the_row_count(threads: int) -> None:
    """Bitwise: a token decoded alone and the same token in a verified draft tree get the same
    projections. Checked for every count to 70 and for INVARIANT_ROWS (a tree of 127 tokens and its
    root). More rows (a prefill chunk) run as the dense GEMM of the dequantised weight."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = _weight(576, 960, 32, sym=False, seed=5)
        lin = _linear(w)
        x = torch.randn(300, 576).to(torch.bfloat16)
        alone = torch.cat([lin(x[i:i + 1]) for i in range(70)])
        for rows in list(range(2, 71)) + [INVARIANT_ROWS]:
            together = lin(x[:rows])
            assert torch.equal(together[:min(rows, 70)], alone[:rows]), rows
        chunk = lin(x)
        assert torch.equal(chunk, F.linear(x, lin.dequantize(torch.bfloat16), lin.bias)), "prefill chunk"
        ref = x.double() @ lin.dequantize().double().t()
        assert float((chunk.double() - ref).abs().max()) <= 3 * _bf16_bound(x, lin.dequantize().double(), ref) + 1e-2
    finally:
        torch.set_num_threads(before)


def test_refusals_take_the_dequantised_path(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 96).to(torch.bfloat16)
    cases = {
        "not a multiple of 16": _linear(_weight(96, 24, 32, sym=True)),
        "group size 16": _linear(_weight(96, 32, 16, sym=True)),
        "group size 48": _linear(_weight(96, 32, 48, sym=True)),
    }
    for reason, lin in cases.items():
        assert reason in w4a16_cpu.rejection(x, lin.weight)
        y = lin(x)
        ref = x.double() @ lin.dequantize().double().t()
        torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
        assert lin.weight._cpu_int4 is None
    ok = _linear(_weight(96, 32, 32, sym=True))
    for dtype in (torch.float16, torch.float32):  # the kernel is not vectorised for these: 5-50x slower
        assert "bfloat16 only" in w4a16_cpu.rejection(x.to(dtype), ok.weight)
        ok(x.to(dtype))
        assert ok.weight._cpu_int4 is None
    monkeypatch.setenv("EDGESPEC_CPU_INT4", "0")
    assert w4a16_cpu.rejection(x, ok.weight) == "EDGESPEC_CPU_INT4=0" and not w4a16_cpu.available()
    monkeypatch.setenv("EDGESPEC_CPU_INT4", "yes")
    with pytest.raises(ValueError, match="EDGESPEC_CPU_INT4 must be 0 or 1"):
        ok(x)


def test_packing_is_made_once_and_empty_inputs_work() -> None:
    lin = _linear(_weight(64, 32, 32, sym=False))
    lin(torch.randn(1, 64).to(torch.bfloat16))
    packed = lin.weight._cpu_int4
    lin(torch.randn(4, 64).to(torch.bfloat16))
    assert lin.weight._cpu_int4 is packed
    assert lin(torch.randn(0, 64).to(torch.bfloat16)).shape == (0, 32)
    assert lin(torch.randn(2, 3, 64).to(torch.bfloat16)).shape == (2, 3, 32)


def test_gguf_q4_stays_4bit_on_the_cpu_for_bf16_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert gguf_q4_by_default(cpu, torch.bfloat16)
    assert not gguf_q4_by_default(cpu, torch.float32) and not gguf_q4_by_default(cpu, torch.float16)
    monkeypatch.setenv("EDGESPEC_CPU_INT4", "0")
    assert not gguf_q4_by_default(cpu, torch.bfloat16)


@pytest.mark.slow
def test_demo_model_4bit_speculative_equals_plain_and_tracks_the_dequantised_model(demo_gguf: Path) -> None:
    """The demo GGUF (Q4_1) loads 4-bit on the CPU in bf16; greedy speculative output equals plain
    output token for token; its logits stay close to the dequantised model's."""
    target = edgespec.LLM.load(str(demo_gguf), device="cpu", dtype=torch.bfloat16, max_context=512, draft=None)
    assert isinstance(target.model.layers[0].qkv, QuantLinear)
    spec = edgespec.LLM.load(str(demo_gguf), device="cpu", dtype=torch.bfloat16, max_context=512)
    for llm in (target, spec):
        llm.prefix_caching = False
    for prompt in ("Name three colours of the rainbow.", "Write a haiku about rain."):
        ids = target.encode(prompt, chat=True)
        plain = target.generate(ids, max_new_tokens=40, ignore_eos=True).token_ids
        assert spec.generate(ids, max_new_tokens=40, ignore_eos=True).token_ids == plain

    dense = edgespec.LLM.load(str(demo_gguf), device="cpu", dtype=torch.float32, max_context=512,
                              draft=None, quantized=False).model
    tokens = torch.tensor(target.encode("The capital of France is", chat=False))
    with torch.no_grad():
        ours = target.model.logits(target.model.forward(tokens, torch.arange(tokens.numel()),
                                                        target.model.new_cache(64), 0).hidden).float()
        ref = dense.logits(dense.forward(tokens, torch.arange(tokens.numel()), dense.new_cache(64), 0).hidden)
    # bf16 activations through 30 layers: logits of magnitude ~20 within a few tenths, same ranking at the top.
    assert float((ours - ref).abs().max()) < 1.0
    assert torch.equal(ours[-1].topk(3).indices, ref[-1].topk(3).indices)


def test_default_tree_follows_the_weights_the_cpu_runs() -> None:
    """4-bit weights on the int4 kernel get the small CPU tree (its cost grows with the rows);
    4-bit weights the CPU dequantises (fp32 compute) cost what dense ones do: the dense tree."""
    from types import SimpleNamespace

    from edgespec.ops import DenseLinear
    from edgespec.spec import DEFAULT_SETTINGS, default_settings

    cpu = torch.device("cpu")
    quant = _linear(_weight(64, 32, 32, sym=True))

    def model(qkv, dtype):
        return SimpleNamespace(device=cpu, dtype=dtype, layers=[SimpleNamespace(qkv=qkv)])

    assert default_settings(model(quant, torch.bfloat16)) == DEFAULT_SETTINGS["cpu-quantized"]
    assert default_settings(model(quant, torch.float32)) == DEFAULT_SETTINGS["cpu"]
    assert default_settings(model(DenseLinear(torch.randn(32, 64)), torch.bfloat16)) == DEFAULT_SETTINGS["cpu"]
    assert DEFAULT_SETTINGS["cpu-quantized"].tree_size < DEFAULT_SETTINGS["cpu"].tree_size


def test_loading_packs_the_projections_before_the_first_call(demo_gguf: Path) -> None:
    """The loader makes the int4 packing (so the first request does not pay for it); weights the
    kernel does not run in the model's dtype are left alone."""
    llm = edgespec.LLM.load(str(demo_gguf), device="cpu", dtype=torch.bfloat16, max_context=64, draft=None)
    weights = [lin.weight for layer in llm.model.layers
               for lin in (layer.qkv, layer.o, layer.ffn.gate_up, layer.ffn.down)]
    # SmolLM2's projections have N % 64 == 0: kept in torch's packing alone.
    assert all(w._cpu_int4 is not None and w.layout == "cpu" and w._cpu_int4[0] is w.qweight for w in weights)
    fp32 = edgespec.LLM.load(str(demo_gguf), device="cpu", dtype=torch.float32, max_context=64, draft=None,
                             quantized=True)
    assert isinstance(fp32.model.layers[0].qkv, QuantLinear) and fp32.model.layers[0].qkv.weight._cpu_int4 is None


@pytest.mark.parametrize("k,n", [(32, 64), (96, 128), (576, 960), (1536, 576), (2048, 3072)])
def test_cpu_layout_round_trips(k: int, n: int) -> None:
    """torch's packing is read back exactly (layout.unpack_cpu), which is what lets a weight live
    in it alone."""
    q = torch.randint(0, 16, (k, n), generator=torch.Generator().manual_seed(k + n), dtype=torch.uint8)
    packed = layout.pack_cpu(q)
    assert packed is not None and packed.dtype == torch.uint8 and packed.shape == (n, k // 2)
    assert torch.equal(layout.unpack_cpu(packed, k, n), q)
    assert torch.equal(layout.unpack_cpu_transposed(packed, k, n), q.t())
    # Outputs: whole 64-column blocks from the second one on (about half of them), inputs: any range.
    n0 = 64 if n > 64 else 0
    n1, k0 = n0 + 64 * max(1, n // 128), k // 3
    assert torch.equal(layout.unpack_cpu_transposed(packed, k, n, (n0, n1), (k0, k - 1)), q[k0:k - 1, n0:n1].t())


def test_cpu_layout_refuses_what_it_cannot_hold() -> None:
    assert layout.pack_cpu(torch.randint(0, 16, (64, 48), dtype=torch.uint8)) is None  # N % 64
    with pytest.raises(ValueError, match="unpack_cpu: expected uint8"):
        layout.unpack_cpu(torch.zeros(64, 16, dtype=torch.uint8), 32, 48)
    packed = torch.zeros(128, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outputs 32..128 must be multiples of 64"):
        layout.unpack_cpu_transposed(packed, 32, 128, outputs=(32, 128))
    with pytest.raises(ValueError, match="inputs 0..33 within K=32"):
        layout.unpack_cpu_transposed(packed, 32, 128, inputs=(0, 33))
    w = _linear(_weight(64, 64, 32, sym=True)).weight
    from edgespec.ops.w4a16 import W4A16Weight

    with pytest.raises(ValueError, match="cpu qweight must be uint8"):
        W4A16Weight(qweight=torch.zeros(64, 16, dtype=torch.uint8), scales=w.scales, zeros=None, group_size=32,
                    in_features=64, out_features=64, layout="cpu")


@pytest.mark.parametrize("sym", [True, False])
def test_prepared_weight_computes_the_same_and_still_converts(sym: bool) -> None:
    """prepare() moves a weight into torch's packing alone: bitwise the same outputs, the same
    dequantised weight, and to()/fuse()/sub() still work or fall back."""
    lin = _linear(_weight(576, 192, 64, sym=sym, seed=9), bias=torch.randn(192))
    x = torch.randn(5, 576).to(torch.bfloat16)
    expected = lin(x)
    moved = w4a16_cpu.prepare(lin.weight, torch.bfloat16)
    assert moved.layout == "cpu" and moved.nbytes() < lin.weight.nbytes() + 1
    prepared = QuantLinear(moved, lin.bias)
    assert torch.equal(prepared(x), expected)
    assert torch.equal(prepared.dequantize(), lin.dequantize()) and torch.equal(prepared.ints(), lin.ints())
    assert moved.sub(outputs=(0, 64)) is None
    fused = QuantLinear.fuse([prepared, prepared])
    assert torch.equal(fused(x), torch.cat([expected, expected], dim=-1))
    plain = prepared.to(dtype=torch.float32)
    assert plain.weight.layout == "plain" and torch.equal(plain.ints(), lin.ints())
    narrow = _linear(_weight(96, 48, 32, sym=sym))  # N % 64 != 0: keeps its layout, packing made beside it
    same = w4a16_cpu.prepare(narrow.weight, torch.bfloat16)
    assert same is narrow.weight and same.layout == "plain" and same._cpu_int4 is not None
    assert w4a16_cpu.prepare(lin.weight, torch.float32) is lin.weight  # not the kernel's dtype: untouched


def test_a_prefill_of_several_chunks_dequantises_each_weight_once(demo_gguf: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill chunks of more than INVARIANT_ROWS rows run the dense GEMM of each 4-bit weight
    dequantised: the first chunk's copies serve the later ones (keep_dequantized), the budget they
    took is given back at the end, and the logits are the same bits as dequantising per chunk."""
    from edgespec.generation import prefill
    from edgespec.ops import w4a16

    model = edgespec.LLM.load(str(demo_gguf), device="cpu", dtype=torch.bfloat16, max_context=512, draft=None).model
    assert isinstance(model.layers[0].qkv, QuantLinear)
    ids = torch.randint(0, 1000, (3 * INVARIANT_ROWS + 50,), generator=torch.Generator().manual_seed(0))
    calls: list[int] = []
    real = w4a16.W4A16Weight.dequantize

    def counted(self, dtype=torch.float32):
        calls.append(id(self))
        return real(self, dtype)

    monkeypatch.setattr(w4a16.W4A16Weight, "dequantize", counted)
    before = w4a16.DEQUANT_BUDGET.used.get("cpu", 0)
    results = []
    for keep in (True, False):
        if not keep:
            monkeypatch.setattr(w4a16, "keep_dequantized", contextlib.nullcontext)
        calls.clear()
        cache = model.new_cache(ids.numel())
        hidden, _ = prefill(model, cache, ids, INVARIANT_ROWS + 1, start=0)  # 4 chunks of > INVARIANT_ROWS rows
        results.append((model.logits(hidden), cache.k[:, :ids.numel()].clone(), list(calls)))
        assert w4a16.DEQUANT_BUDGET.used.get("cpu", 0) == before
    (kept_logits, kept_k, kept_calls), (each_logits, each_k, each_calls) = results
    weights = len(set(each_calls))
    assert len(kept_calls) == len(set(kept_calls)) == weights  # once each, not once per chunk
    assert len(each_calls) == 3 * weights  # the last chunk (50 rows) runs on the int4 kernel
    assert torch.equal(kept_logits, each_logits) and torch.equal(kept_k, each_k)


def test_keep_dequantized_respects_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgespec.ops import w4a16

    lin = _linear(_weight(256, 64, 32, sym=False))
    x = torch.randn(INVARIANT_ROWS + 1, 256).to(torch.bfloat16)
    monkeypatch.setenv("EDGESPEC_W4A16_CACHE_MB", "0")   # nothing may be kept: each call dequantises
    with w4a16.keep_dequantized():
        first = w4a16.prefill_dense(lin.weight, torch.bfloat16)
        assert w4a16.prefill_dense(lin.weight, torch.bfloat16) is not first
        ref = lin(x)
    monkeypatch.delenv("EDGESPEC_W4A16_CACHE_MB")
    with w4a16.keep_dequantized():
        first = w4a16.prefill_dense(lin.weight, torch.bfloat16)
        assert w4a16.prefill_dense(lin.weight, torch.bfloat16) is first
        assert torch.equal(lin(x), ref)
        with w4a16.keep_dequantized():  # a nested block keeps its own, and gives them back
            assert w4a16.prefill_dense(lin.weight, torch.bfloat16) is not first
        assert w4a16.prefill_dense(lin.weight, torch.bfloat16) is first
    assert w4a16.prefill_dense(lin.weight, torch.bfloat16) is not first  # outside: per call
    assert w4a16.DEQUANT_BUDGET.used.get("cpu", 0) == 0
