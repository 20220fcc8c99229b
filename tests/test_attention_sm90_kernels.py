"""The Hopper causal-prefill attention kernel (csrc/kernels/sm90/attention_prefill.cu: wgmma with
128-byte-swizzled shared-memory operands) against the fp32 oracle, with the rule and the poisoned
outputs of test_attention_kernels.py.

On the CPU emulator (`emulated`) the kernel runs with tools/cuda_emulator/wgmma.cuh in place of its
PTX: the descriptors, swizzle, fragment layouts and asynchrony as the PTX ISA documents them. On a
GPU (`gpu`) only a compute capability 9.0 device runs it (others skip), at the issue's sizes.
"""
from __future__ import annotations

import pytest
import torch

from edgespec.ops import _kernels
from kernel_checks import assert_attention_close, attention_inputs, device_cases

DTYPES = [torch.bfloat16, torch.float16]
GQA = [(4, 4), (8, 2), (7, 1), (16, 1)]  # (Hq, Hkv): ratios 1, 4, 7, 16


@pytest.fixture
def hopper(kernel_device):
    """kernel_device, skipping a GPU that is not compute capability 9.0 or a build without sm90."""
    if kernel_device.type == "cuda":
        if torch.cuda.get_device_capability(kernel_device) != (9, 0):
            pytest.skip("the sm90 kernels need a compute capability 9.0 GPU")
        probe = torch.zeros(64, 1, 64, dtype=torch.bfloat16, device=kernel_device)
        why = _kernels.sm90_attention_rejection(probe)
        if why is not None:
            pytest.skip(why)
    return kernel_device


def _sm90(q, k, v, scale):
    return _kernels.attention(q, k, v, scale, sm90=True)


# (T, prefix): one row tile, several with a ragged last one, a prefix that is not a multiple of the
# 64-key tile, rows whose diagonal crosses tiles; on the GPU also the odd lengths.
PREFILL = device_cases(emulated=[(1, 0), (19, 57), (64, 0), (99, 140), (130, 5)],
                       gpu=[(t, p) for t in (1, 19, 99, 989) for p in (0, 57, 1000)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("kernel_device, t, prefix", PREFILL, indirect=["kernel_device"])
def test_sm90_prefill_matches_oracle(hopper, t: int, prefix: int, hq: int, hkv: int, d: int, dtype: torch.dtype,
                                     monkeypatch) -> None:
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, dtype, t * 7919 + prefix * 31 + hq + d, hopper)
    assert_attention_close(_sm90(q, k, v, d ** -0.5), q, k, v, d ** -0.5, None, monkeypatch,
                           f"sm90 prefill T={t} prefix={prefix}")


@pytest.mark.parametrize("kernel_device, model, t, prefix",
                         device_cases(emulated=[("llama3-8b", 70, 0)],
                                      gpu=[("llama3-8b", 4096, 0), ("llama3-8b", 2048, 30000),
                                           ("minicpm4-8b", 4096, 0), ("smollm2", 1000, 3000)]),
                         indirect=["kernel_device"])
def test_sm90_prefill_at_model_shapes(hopper, model: str, t: int, prefix: int, monkeypatch) -> None:
    hq, hkv, d = {"llama3-8b": (32, 8, 128), "minicpm4-8b": (32, 2, 128), "smollm2": (9, 3, 64)}[model]
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, torch.bfloat16, 5, hopper)
    assert_attention_close(_sm90(q, k, v, d ** -0.5), q, k, v, d ** -0.5, None, monkeypatch,
                           f"{model} prefill T={t} prefix={prefix}")


def test_sm90_prefill_takes_a_query_view_of_fused_qkv(hopper, monkeypatch) -> None:
    """q as a strided view (rows of a fused QKV projection), like the decoder passes it."""
    q, k, v = attention_inputs(40, 30, 8, 2, 128, torch.bfloat16, 9, hopper)
    fused = torch.cat([q.reshape(40, -1), torch.randn(40, 512, device=hopper).to(q.dtype)], dim=1)
    view = fused[:, :8 * 128].view(40, 8, 128)
    assert not view.is_contiguous()
    assert_attention_close(_sm90(view, k, v, 0.1), q, k, v, 0.1, None, monkeypatch, "strided q")


def test_sm90_rejects_what_it_does_not_take(hopper) -> None:
    from oracle.attention import pack_bits, tree_visibility

    q, k, v = attention_inputs(5, 10, 8, 2, 64, torch.bfloat16, 1, hopper)
    mask = pack_bits(tree_visibility([-1, 0, 0, 1, 2])).to(hopper)
    with pytest.raises(ValueError, match="the sm90 kernel is the causal prefill: it takes no tree mask"):
        _kernels.attention(q, k, v, 0.1, mask, sm90=True)
    with pytest.raises(ValueError, match="takes no device-side seqlen"):
        _kernels.attention(q, k, v, 0.1, sm90=True, seqlen=torch.tensor([15], dtype=torch.int32, device=hopper))


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_kernels")
def test_emulated_sm90_output_does_not_depend_on_thread_order(monkeypatch) -> None:
    """A missing barrier, wait or fence between the cp.async copies, the stage refill and the
    asynchronous wgmma reads changes the result under some schedule (the emulator computes a
    wgmma when its group is waited for, reading shared memory then)."""
    q, k, v = attention_inputs(77, 64, 8, 2, 128, torch.bfloat16, 21, torch.device("cpu"))
    outputs = []
    for schedule in ["forward", "reverse", "random:1", "serial", "serial-reverse"]:
        monkeypatch.setenv("CUEMU_SCHEDULE", schedule)
        outputs.append(_sm90(q, k, v, 0.1))
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_ops")
def test_ops_attention_takes_the_sm90_kernel_only_when_asked(monkeypatch) -> None:
    """EDGESPEC_SM90_ATTENTION=1 sends causal chunks of 64 tokens and more to the Hopper kernel;
    decode steps, short chunks and trees keep the generic kernel; without it nothing changes."""
    from edgespec import ops
    from oracle.attention import pack_bits, tree_visibility

    calls = []
    real = _kernels.attention

    def spy(*args, sm90=False, **kwargs):
        calls.append(sm90)
        return real(*args, sm90=sm90, **kwargs)

    monkeypatch.setattr(_kernels, "attention", spy)
    cpu = torch.device("cpu")
    prefill = attention_inputs(70, 10, 8, 2, 64, torch.bfloat16, 3, cpu)
    chunk = attention_inputs(63, 10, 8, 2, 64, torch.bfloat16, 4, cpu)
    tree = attention_inputs(80, 10, 8, 2, 64, torch.bfloat16, 5, cpu)
    mask = pack_bits(tree_visibility([-1] + list(range(79)))).to(cpu)
    for asked in ("0", "1"):
        monkeypatch.setenv("EDGESPEC_SM90_ATTENTION", asked)
        calls.clear()
        out = ops.attention(*prefill, 0.1)
        ops.attention(*chunk, 0.1)
        ops.attention(*tree, 0.1, mask)
        assert calls == [asked == "1", False, False]
        assert_attention_close(out, *prefill, 0.1, None, monkeypatch, f"ops prefill, EDGESPEC_SM90_ATTENTION={asked}")
    monkeypatch.setenv("EDGESPEC_SM90_ATTENTION", "yes")
    with pytest.raises(ValueError, match="EDGESPEC_SM90_ATTENTION must be 0 or 1"):
        ops.attention(*prefill, 0.1)
