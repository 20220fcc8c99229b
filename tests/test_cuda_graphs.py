"""Decode steps as CUDA graphs (edgespec.cuda_graphs): what makes one graph serve every step is
checked on the CPU and the emulator (a device-side cache slot and length give the results of the
host-side ones), the capture and replay themselves on a GPU (`gpu`)."""
from __future__ import annotations

import pytest
import torch

from edgespec import LLM, cuda_graphs, ops
from edgespec.generation import PlainDecoding
from edgespec.loading import LoadedModel, load_model
from edgespec.ops import _kernels
from kernel_checks import assert_attention_close, attention_inputs


def _model(tiny_model_dir, device="cpu", dtype=torch.float32, max_context=128, **overrides):
    path = tiny_model_dir("llama", seed=5, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=512, num_hidden_layers=2, max_position_embeddings=1024, **overrides)
    return load_model(str(path), device=device, dtype=dtype, max_context=max_context, with_tokenizer=False).model


def _steps(model, start_as_tensor: bool, tokens: torch.Tensor, chunks=(7, 1, 1, 5, 1),
           cache_view: int | None = None) -> list[torch.Tensor]:
    """Logits of consecutive forward calls over `tokens`, cut into `chunks`, from slot 0 on."""
    cache = model.new_cache()
    cache.k.fill_(float("nan"))  # slots nobody wrote must never be read
    cache.v.fill_(float("nan"))
    out, start = [], 0
    for n in chunks:
        part = tokens[start:start + n]
        positions = torch.arange(start, start + n, device=model.device)
        s = torch.tensor([start], device=model.device) if start_as_tensor else start
        out.append(model.logits(model.forward(part, positions, cache, s, cache_view=cache_view).hidden))
        start += n
    return out


def test_device_side_start_gives_the_host_side_results_on_cpu(tiny_model_dir) -> None:
    """The torch path: the KV written with index_copy_ at a tensor slot and attention over the
    first `seqlen` slots of the whole cache are bit for bit the host-int path."""
    model = _model(tiny_model_dir)
    tokens = torch.randint(3, 200, (15,), generator=torch.Generator().manual_seed(0))
    for view in (None, 16, 64):  # the whole cache, or a view of its first slots (a length bucket)
        for a, b in zip(_steps(model, True, tokens, cache_view=view), _steps(model, False, tokens)):
            assert torch.equal(a, b)


def test_length_buckets() -> None:
    assert [cuda_graphs.view_bucket(n, 4096) for n in (1, 256, 257, 1000, 4096)] == [256, 256, 512, 1024, 4096]
    assert cuda_graphs.view_bucket(300, 300) == 300 and cuda_graphs.view_bucket(5, 100) == 100


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_ops")
def test_device_side_start_on_the_emulated_kernels(tiny_model_dir) -> None:
    """The kernel path reads the length on the device (its split plan follows the cache's 128 slots
    rather than the current length, so the bits may differ; the values may not)."""
    model = _model(tiny_model_dir, dtype=torch.bfloat16)
    tokens = torch.randint(3, 200, (15,), generator=torch.Generator().manual_seed(1))
    for a, b in zip(_steps(model, True, tokens), _steps(model, False, tokens)):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max().item() <= 2e-2 * b.abs().max().item()


@pytest.mark.parametrize("t, length, tree", [(1, 1, False), (1, 300, False), (19, 200, False), (9, 400, True)])
def test_attention_kernel_reads_its_length_on_the_device(kernel_device, t: int, length: int, tree: bool,
                                                         monkeypatch) -> None:
    """q against a view of 512 slots of which `length` count (NaN past them): the oracle of the
    first `length` slots, with the split plan of the whole view."""
    from oracle.attention import pack_bits, random_tree, tree_visibility

    q, k, v = attention_inputs(t, length - t, 8, 2, 128, torch.bfloat16, length, kernel_device)
    full_k = torch.full((512, 2, 128), float("nan"), dtype=torch.bfloat16, device=kernel_device)
    full_v = full_k.clone()
    full_k[:length], full_v[:length] = k, v
    mask = pack_bits(tree_visibility(random_tree(t, torch.Generator().manual_seed(t)))).to(kernel_device) if tree \
        else None
    seqlen = torch.tensor([length], dtype=torch.int32, device=kernel_device)
    for splits in (None, 1, 5):
        out = _kernels.attention(q, full_k, full_v, 0.09, mask, splits=splits, seqlen=seqlen)
        assert_attention_close(out, q, k, v, 0.09, mask, monkeypatch, f"seqlen {length} splits {splits}")
    with pytest.raises(ValueError, match="seqlen must be int32"):
        _kernels.attention(q, full_k, full_v, 0.09, mask, seqlen=seqlen.long())


def test_op_torch_path_reads_seqlen_on_the_host() -> None:
    q, k, v = attention_inputs(3, 40, 4, 2, 64, torch.float32, 0, "cpu")
    full_k = torch.cat([k, torch.full_like(k, float("nan"))])
    full_v = torch.cat([v, torch.full_like(v, float("nan"))])
    seqlen = torch.tensor([43], dtype=torch.int32)
    assert torch.equal(ops.attention(q, full_k, full_v, 0.125, seqlen=seqlen), ops.attention(q, k, v, 0.125))
    with pytest.raises(ValueError, match="seqlen 2 must hold the 3 new tokens"):
        ops.attention(q, full_k, full_v, 0.125, seqlen=torch.tensor([2], dtype=torch.int32))


def test_graphs_are_opt_in_and_need_a_dense_cuda_model(tiny_model_dir, monkeypatch) -> None:
    model = _model(tiny_model_dir)
    assert not cuda_graphs.requested()
    assert PlainDecoding(model, model.new_cache())._graph is None  # CPU: never, whatever the environment
    monkeypatch.setenv("EDGESPEC_CUDA_GRAPHS", "1")
    assert cuda_graphs.requested() and PlainDecoding(model, model.new_cache())._graph is None
    with pytest.raises(ValueError, match="need a CUDA model"):
        cuda_graphs.DecodeGraphs(model, model.new_cache())
    with pytest.raises(ValueError, match="need a CUDA model"):
        cuda_graphs.DecodeGraph(model, model.new_cache(), 64)
    monkeypatch.setenv("EDGESPEC_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="EDGESPEC_CUDA_GRAPHS must be 0 or 1"):
        cuda_graphs.requested()


@pytest.mark.gpu
def test_graph_decoding_matches_eager_decoding_on_a_gpu(tiny_model_dir) -> None:
    """Greedy tokens of 300 graph-replayed steps (crossing from the 256-slot view to the 512-slot
    one) equal eager decoding's, twice (the graphs are kept per cache and reused)."""
    model = _model(tiny_model_dir, device="cuda", dtype=torch.bfloat16, max_context=640)
    prompt = [5, 17, 23, 42, 8, 99, 150, 3]
    eager = LLM(LoadedModel(model, None, "eager"), strategy=lambda m, c: PlainDecoding(m, c, cuda_graph=False))
    graphed = LLM(LoadedModel(model, None, "graphed"), strategy=lambda m, c: PlainDecoding(m, c, cuda_graph=True))
    want = eager.generate(prompt, max_new_tokens=300, ignore_eos=True).token_ids
    for _ in range(2):
        assert graphed.generate(prompt, max_new_tokens=300, ignore_eos=True).token_ids == want
    assert sorted(cuda_graphs._GRAPHS[graphed.cache]) == [256, 512]


@pytest.mark.gpu
def test_graph_decoding_of_a_blockffn_model_keeps_its_statistics(tmp_path) -> None:
    """BlockFFN layers count steps on the host, which a replay skips: the graph counts for them, so
    the sparsity statistics of a graphed generation equal the eager one's."""
    from edgespec.models.blockffn import write_random_blockffn

    path = write_random_blockffn(tmp_path / "blockffn", hidden_size=256, num_heads=4, num_kv_heads=2, num_layers=2,
                                 num_experts=16, expert_size=32, seed=4)
    model = load_model(str(path), device="cuda", dtype=torch.bfloat16, max_context=128, with_tokenizer=False).model
    prompt = [5, 17, 23, 42, 8, 99, 150, 3]
    results = {}
    for graph in (False, True):
        llm = LLM(LoadedModel(model, None, "m"), strategy=lambda m, c, g=graph: PlainDecoding(m, c, cuda_graph=g))
        results[graph] = llm.generate(prompt, max_new_tokens=24, ignore_eos=True)
    assert results[True].token_ids == results[False].token_ids
    eager, graphed = results[False].stats.extra, results[True].stats.extra
    assert graphed["blockffn_steps"] == eager["blockffn_steps"] == 23
    assert graphed["blockffn_token_sparsity"] == eager["blockffn_token_sparsity"]
