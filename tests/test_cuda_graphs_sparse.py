"""CUDA graphs of a model with InfLLM-v2 sparse attention (MiniCPM4 sparse_config): the host decides
whether a step is sparse and writes its compressed-key and selection lengths into the cache's
SparseState before the step; the step reads them on the device. Checked on the CPU (the graphs'
static buffers run eagerly, record=False: the eager steps' bits), on the emulated kernels (the
kernel path with device-side lengths) and, for capture and replay, on a GPU (`gpu`)."""
from __future__ import annotations

import json

import pytest
import torch

from edgespec import LLM, cuda_graphs
from edgespec.generation import PlainDecoding
from edgespec.loading import LoadedModel, load_model
from edgespec.ops.attention import pack_tree_mask
from sparse_cases import SMALL


def _sparse_model(tiny_model_dir, device="cpu", dtype=torch.float32, max_context=400, dense_len=128, **over):
    """A MiniCPM4-style random model: sparse from `dense_len` tokens on (2-block window, top-4),
    head dim 64 (the attention kernels' smallest)."""
    path = tiny_model_dir("llama", seed=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=256,
                          intermediate_size=256, num_hidden_layers=2, max_position_embeddings=2048, **over)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="minicpm", scale_emb=2.0, scale_depth=1.4, dim_model_base=64,
                  sparse_config={**SMALL, "dense_len": dense_len})
    (path / "config.json").write_text(json.dumps(config))
    return load_model(str(path), device=device, dtype=dtype, max_context=max_context, with_tokenizer=False).model


def _buffered_plain(model, cache):
    strategy = PlainDecoding(model, cache)
    strategy._graph = cuda_graphs.StepGraphs(model, cache, record=False)
    return strategy


def _ck(model, cache):
    """The compressed keys the state holds up to date, per layer, and the host lengths."""
    st = model.sparse.state(cache)
    return [st.ck[i, :model.config.sparse_config.num_kernels(v)].clone() for i, v in enumerate(st.valid)], list(st.valid)


def test_decode_steps_through_graph_buffers_give_the_eager_bits(tiny_model_dir) -> None:
    """One-token steps through the graphs' static buffers, from below dense_len to past it and
    across the 256-slot view, give the eager steps' logits and compressed keys bit for bit; the
    graphs are split at dense_len."""
    model = _sparse_model(tiny_model_dir)
    tokens = torch.randint(3, 200, (300,), generator=torch.Generator().manual_seed(0))
    runs = []
    for graphed in (False, True):
        cache = model.new_cache()
        graphs = cuda_graphs.StepGraphs(model, cache, record=False)
        model.forward(tokens[:100], torch.arange(100), cache, 0)
        logits = []
        for pos in range(100, 300):
            if graphed:
                logits.append(graphs.decode(int(tokens[pos]), pos).clone())
            else:
                logits.append(model.logits(model.forward(tokens[pos:pos + 1], torch.tensor([pos]), cache, pos).hidden))
        runs.append((torch.cat(logits), *_ck(model, cache)))
        if graphed:
            span = cache.attention_span
            assert sorted(graphs.graphs, key=str) == sorted(
                [(256, 1, False, (), None, span), (256, 1, False, (), 128, span), (400, 1, False, (), 128, span)], key=str)
    (la, cka, va), (lb, ckb, vb) = runs
    assert torch.equal(la, lb)
    assert va == vb == [300, 300] and all(torch.equal(a, b) for a, b in zip(cka, ckb))


def test_plain_and_speculative_generations_through_graph_buffers_keep_the_eager_tokens(tiny_model_dir,
                                                                                        tmp_path) -> None:
    """Greedy and sampled generations past dense_len, plain and speculative (EAGLE head; its tree
    verifications take the prefix's compressed keys, the tree through its mask), commit the eager
    tokens with the same acceptance when their steps run through the graphs' static buffers."""
    from edgespec.spec import enable_speculation
    from edgespec.spec.train_head import random_head
    from test_cuda_graphs import _with_graphs

    model = _sparse_model(tiny_model_dir, vocab_size=64)
    prompt = torch.randint(3, 64, (110,), generator=torch.Generator().manual_seed(1)).tolist()
    kwargs = [dict(max_new_tokens=60, ignore_eos=True), dict(max_new_tokens=60, ignore_eos=True, temperature=0.8, seed=4)]
    plain = LLM(LoadedModel(model, None, "m"))
    want = [plain.generate(prompt, **kw).token_ids for kw in kwargs]
    buffered = LLM(LoadedModel(model, None, "m"), strategy=_buffered_plain)
    assert [buffered.generate(prompt, **kw).token_ids for kw in kwargs] == want
    assert {key[4] for key in cuda_graphs._GRAPHS[buffered.cache]} == {None, 128}

    llm = LLM(LoadedModel(model, None, "m"))
    enable_speculation(llm, draft=str(random_head(model.config, tmp_path / "head", seed=1, std=0.4)),
                       tree_size=12, depth=4, topk=3)
    eager = [llm.generate(prompt, **kw) for kw in kwargs]
    assert eager[0].token_ids == want[0]
    calls: list = []
    _with_graphs(llm, record=False, calls=calls)
    for kw, ref in zip(kwargs, eager):
        got = llm.generate(prompt, **kw)
        assert got.token_ids == ref.token_ids
        assert got.stats.extra["acceptance_histogram"] == ref.stats.extra["acceptance_histogram"]
    assert any(kind == "verify" for kind, _ in calls)
    assert {key[4] for key in cuda_graphs._GRAPHS[llm.cache]} == {None, 128}


def test_the_host_writes_each_step_its_lengths(tiny_model_dir) -> None:
    """prepare_device_step: a sparse step trusts the compressed keys below its start (recomputing
    those over rejected or moved slots), a tree stops them at its prefix, a dense step only stops
    trusting; the graphed step reads the lengths from the buffer, not from the host state."""
    model = _sparse_model(tiny_model_dir)
    sparse = model.sparse
    cache = model.new_cache()
    tokens = torch.randint(3, 200, (200,), generator=torch.Generator().manual_seed(2))
    model.forward(tokens[:150], torch.arange(150), cache, 0)
    st = sparse.state(cache)
    assert st.valid == [150, 150]
    assert not sparse.prepare_device_step(cache, 100, 1, tree=False)   # below dense_len: dense
    assert st.valid == [100, 100]
    st.valid = [150, 140]
    assert sparse.prepare_device_step(cache, 145, 13, tree=True)
    assert st.ranges.tolist() == [[145, 145], [140, 145]] and st.valid == [145, 145]
    assert sparse.prepare_device_step(cache, 150, 1, tree=False)
    assert st.ranges.tolist() == [[145, 151], [145, 151]] and st.valid == [151, 151]

    # A graphed step at 600 (top-4 of 7 scored blocks) whose buffer has been prepared gives the
    # eager step's bits with the host lengths scrambled, and other bits with the buffer scrambled.
    model = _sparse_model(tiny_model_dir, max_context=800)
    sparse = model.sparse
    tokens = torch.randint(3, 200, (601,), generator=torch.Generator().manual_seed(2))
    eager_cache, cache = model.new_cache(), model.new_cache()
    model.forward(tokens[:600], torch.arange(600), eager_cache, 0)
    want = model.logits(model.forward(tokens[600:601], torch.tensor([600]), eager_cache, 600).hidden)
    model.forward(tokens[:600], torch.arange(600), cache, 0)
    graph = cuda_graphs.StepGraph(model, cache, 800, record=False, sparse=True)
    sparse.prepare_device_step(cache, 600, 1, tree=False)
    st = sparse.state(cache)
    st.valid = [10**6, -5]
    graph.tokens.fill_(int(tokens[600]))
    graph.positions.fill_(600)
    graph.start.fill_(600)
    with torch.inference_mode():
        assert torch.equal(graph._step()[0], want)
        st.ranges[:, 0].fill_(0)                   # recompute every kernel: the same keys, the same bits
        assert torch.equal(graph._step()[0], want)
        st.ranges[:, 1].fill_(40)                  # a selection that sees only 40 tokens' kernels
        assert not torch.equal(graph._step()[0], want)


def test_sparse_graph_misuse_is_refused(tiny_model_dir) -> None:
    model = _sparse_model(tiny_model_dir)
    cache = model.new_cache()
    with pytest.raises(ValueError, match="needs sparse_active, from SparseAttention.prepare_device_step"):
        model.forward(torch.tensor([5]), torch.tensor([0]), cache, torch.tensor([0]))
    with pytest.raises(ValueError, match="sparse_active is for a device-side start"):
        model.forward(torch.tensor([5]), torch.tensor([0]), cache, 0, sparse_active=True)
    dense_graph = cuda_graphs.StepGraph(model, cache, 256, record=False)
    with pytest.raises(ValueError, match="captured for dense attention; a step at slot 200 is sparse"):
        dense_graph.decode(5, 200)
    sparse_graph = cuda_graphs.StepGraph(model, cache, 256, record=False, sparse=True)
    with pytest.raises(ValueError, match="captured for sparse attention; a step at slot 3 is dense"):
        sparse_graph.decode(5, 3)
    model.sparse.mode = "sparse"
    try:
        with pytest.raises(ValueError, match=r"from 128 tokens on; the model's sparse mode \('sparse'\) now says 0"):
            sparse_graph.decode(5, 200)
        # StepGraphs keys its graphs by the switch point: a new one for the new mode.
        graphs = cuda_graphs.StepGraphs(model, cache, record=False)
        graphs.decode(5, 3)
        assert list(graphs.graphs) == [(256, 1, False, (), 0, cache.max_len)]
    finally:
        model.sparse.mode = "auto"
    dense = load_model(str(tiny_model_dir("llama")), device="cpu", max_context=64, with_tokenizer=False).model
    with pytest.raises(ValueError, match="a sparse step graph needs a model with an InfLLM-v2 sparse_config"):
        cuda_graphs.StepGraph(dense, dense.new_cache(), 64, record=False, sparse=True)


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_ops")
def test_sparse_steps_on_the_emulated_kernels_read_their_lengths_on_the_device(tiny_model_dir, monkeypatch) -> None:
    """The kernel path of graph-buffer steps (record=False) past dense_len: the compressed-key and
    selection kernels get the state's device buffer, never a host-made copy, and a decode and a
    13-token tree (scored by the selection kernels with its paths' own kernels) give the eager
    steps' logits bit for bit (the row-invariant mode plans nothing from the view's length)."""
    from edgespec.ops import _kernels
    from oracle.attention import random_tree, tree_visibility

    seen = {"compress": [], "select": [], "attention": []}
    real_compress, real_select, real_attention = _kernels.compress_keys, _kernels.sparse_select_blocks, _kernels.attention

    def compress(*args, lengths=None, **kw):
        seen["compress"].append(lengths)
        return real_compress(*args, lengths=lengths, **kw)

    def select(q, ck, positions, cfg, scale, dense_len, kv_limit, num_blocks, *rest, **kw):
        seen["select"].append(kv_limit)
        return real_select(q, ck, positions, cfg, scale, dense_len, kv_limit, num_blocks, *rest, **kw)

    def attention(*args, block_mask=None, seqlen=None, **kw):
        seen["attention"].append((block_mask is not None, seqlen))
        return real_attention(*args, block_mask=block_mask, seqlen=seqlen, **kw)

    monkeypatch.setattr(_kernels, "attention", attention)
    monkeypatch.setattr(_kernels, "compress_keys", compress)
    monkeypatch.setattr(_kernels, "sparse_select_blocks", select)
    model = _sparse_model(tiny_model_dir, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, 200, (180,), generator=g)
    parents = random_tree(13, g)
    depth = tree_visibility(parents).sum(dim=1) - 1
    mask = pack_tree_mask(tree_visibility(parents))
    tree_tokens = torch.randint(3, 200, (13,), generator=g)
    results = []
    for graphed in (False, True):
        cache = model.new_cache()
        model.forward(tokens[:170], torch.arange(170), cache, 0)
        seen["compress"].clear()
        seen["select"].clear()
        seen["attention"].clear()
        if graphed:
            graphs = cuda_graphs.StepGraphs(model, cache, record=False)
            decode = graphs.decode(int(tokens[170]), 170).clone()
            tree, _ = graphs.verify(tree_tokens, 171 + depth, 171, mask)
            st = model.sparse.state(cache)
            # Every call reads its lengths on the device: the state's ranges (decode and tree, each
            # layer), and per layer of the tree its path kernels' lengths, made on the device too.
            assert len(seen["compress"]) == 6 and all(x is not None and x.is_cuda == st.ranges.is_cuda
                                                      for x in seen["compress"])
            ranges = [x for x in seen["compress"] if x.data_ptr() in (st.ranges[0].data_ptr(), st.ranges[1].data_ptr())]
            assert [x.data_ptr() for x in ranges] == [st.ranges[i % 2].data_ptr() for i in range(4)]
            assert len(seen["select"]) == 4 and all(isinstance(x, torch.Tensor) for x in seen["select"])
            assert len(seen["attention"]) == 4 and all(sparse and isinstance(n, torch.Tensor)
                                                       for sparse, n in seen["attention"])
        else:
            decode = model.logits(model.forward(tokens[170:171], torch.tensor([170]), cache, 170).hidden)
            out = model.forward(tree_tokens, 171 + depth, cache, 171, tree_mask=mask)
            tree = model.logits(out.hidden)
        results.append((decode.float(), tree.float()))
    for eager, graphed in zip(*results):
        assert torch.isfinite(graphed).all()
        assert torch.equal(graphed, eager)  # the row-invariant mode: a longer view adds exact zeros


@pytest.mark.gpu
def test_sparse_graph_replays_match_their_eager_runs_on_a_gpu(tiny_model_dir, tmp_path) -> None:
    """Captured graphs of a sparse model, plain and speculative, greedy and sampled, across
    dense_len and two view buckets, commit the tokens of the same static-buffer steps run eagerly
    (the same kernels, split plans and device-side lengths: the same bits), twice."""
    from edgespec.spec import enable_speculation
    from edgespec.spec.train_head import random_head
    from test_cuda_graphs import _with_graphs

    model = _sparse_model(tiny_model_dir, device="cuda", dtype=torch.bfloat16, max_context=640, vocab_size=64)
    prompt = torch.randint(3, 64, (110,), generator=torch.Generator().manual_seed(1)).tolist()
    kwargs = [dict(max_new_tokens=300, ignore_eos=True), dict(max_new_tokens=80, ignore_eos=True, temperature=0.8, seed=4)]
    buffered = LLM(LoadedModel(model, None, "buffered"), strategy=_buffered_plain)
    want = [buffered.generate(prompt, **kw).token_ids for kw in kwargs]
    graphed = LLM(LoadedModel(model, None, "graphed"), strategy=lambda m, c: PlainDecoding(m, c, cuda_graph=True))
    for _ in range(2):
        assert [graphed.generate(prompt, **kw).token_ids for kw in kwargs] == want
    assert {key[4] for key in cuda_graphs._GRAPHS[graphed.cache]} == {None, 128}

    llm = LLM(LoadedModel(model, None, "spec"))
    enable_speculation(llm, draft=str(random_head(model.config, tmp_path / "head", seed=1, std=0.4)),
                       tree_size=12, depth=4, topk=3)
    _with_graphs(llm, record=False)
    ref = [llm.generate(prompt, **kw) for kw in kwargs]
    _with_graphs(llm, record=True)
    for _ in range(2):
        for kw, r in zip(kwargs, ref):
            got = llm.generate(prompt, **kw)
            assert got.token_ids == r.token_ids
            assert got.stats.extra["acceptance_histogram"] == r.stats.extra["acceptance_histogram"]
