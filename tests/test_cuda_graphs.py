"""Target steps as CUDA graphs (edgespec.cuda_graphs): what makes one graph serve every step is
checked on the CPU and the emulator (a device-side cache slot and length give the results of the
host-side ones; the graphs' static buffers, run eagerly with record=False, give the eager steps'
tokens for plain and speculative decoding), the capture and replay themselves on a GPU (`gpu`)."""
from __future__ import annotations

import pytest
import torch

from edgespec import LLM, cuda_graphs, ops
from edgespec.generation import PlainDecoding
from edgespec.loading import LoadedModel, load_model
from edgespec.ops import _kernels
from kernel_checks import assert_attention_close, attention_inputs, use_attention_family


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


def test_graphs_are_opt_in_and_need_a_cuda_model(tiny_model_dir, monkeypatch) -> None:
    model = _model(tiny_model_dir)
    assert not cuda_graphs.requested()
    assert PlainDecoding(model, model.new_cache())._graph is None  # CPU: never, whatever the environment
    monkeypatch.setenv("EDGESPEC_CUDA_GRAPHS", "1")
    assert cuda_graphs.requested() and PlainDecoding(model, model.new_cache())._graph is None
    with pytest.raises(ValueError, match="need a CUDA model"):
        cuda_graphs.StepGraphs(model, model.new_cache())
    with pytest.raises(ValueError, match="need a CUDA model"):
        cuda_graphs.StepGraph(model, model.new_cache(), 64)
    monkeypatch.setenv("EDGESPEC_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="EDGESPEC_CUDA_GRAPHS must be 0 or 1"):
        cuda_graphs.requested()


def test_step_graph_verify_gives_the_eager_forward(tiny_model_dir) -> None:
    """A tree step through a graph's static buffers (record=False: run, not replayed) computes the
    eager forward's logits and captured streams, bit for bit, and writes the same K/V."""
    from oracle.attention import pack_bits, random_tree, tree_visibility

    model = _model(tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 200, (20,), generator=g)
    parents = random_tree(9, g)
    tree_tokens = torch.randint(3, 200, (9,), generator=g)
    depth = tree_visibility(parents).sum(dim=1) - 1
    mask = pack_bits(tree_visibility(parents))
    results = []
    for graphed in (False, True):
        cache = model.new_cache()
        model.forward(prompt, torch.arange(20), cache, 0)
        if graphed:
            graphs = cuda_graphs.StepGraphs(model, cache, record=False)
            logits, captured = graphs.verify(tree_tokens, 20 + depth, 20, mask, capture=(0, 2))
            assert list(graphs.graphs) == [(128, 9, True, (0, 2), None, 128)]  # the whole cache: 128 slots
        else:
            out = model.forward(tree_tokens, 20 + depth, cache, 20, tree_mask=mask, capture=(0, 2))
            logits, captured = model.logits(out.hidden), out.captured
        results.append((logits, captured, cache.k[:, :29].clone(), cache.v[:, :29].clone()))
    (la, ca, ka, va), (lb, cb, kb, vb) = results
    assert torch.equal(la, lb) and torch.equal(ka, kb) and torch.equal(va, vb)
    assert sorted(ca) == sorted(cb) == [0, 2] and all(torch.equal(ca[i], cb[i]) for i in ca)


def test_step_graph_misuse_is_refused(tiny_model_dir) -> None:
    model = _model(tiny_model_dir)
    cache = model.new_cache()
    tree = cuda_graphs.StepGraph(model, cache, 64, rows=4, tree=True, record=False)
    decode = cuda_graphs.StepGraph(model, cache, 64, record=False)
    with pytest.raises(ValueError, match="decode needs a one-row causal graph, this one has 4 rows and a tree mask"):
        tree.decode(5, 0)
    with pytest.raises(ValueError, match="verify needs a graph captured with a tree mask"):
        decode.verify(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 0, torch.ones(1, 1))
    ok = torch.zeros(4, dtype=torch.int64)
    mask = tree.mask.clone()
    with pytest.raises(ValueError, match=r"positions must be int64 \[4\] for this 4-row graph, got torch.int64 \[3\]"):
        tree.verify(ok, ok[:3], 0, mask)
    with pytest.raises(IndexError, match=r"slots \[61, 65\) are outside this graph's view of 64"):
        tree.verify(ok, ok, 61, mask)
    with pytest.raises(ValueError, match=r"rows must be in \[1, view = 64\], got 65"):
        cuda_graphs.StepGraph(model, cache, 64, rows=65, record=False)
    with pytest.raises(IndexError, match="KV cache overflow: a step needs 129 slots of a cache of 128"):
        cuda_graphs.StepGraphs(model, cache, record=False).decode(5, 128)
    # Draft graphs: only drafters whose rounds read their committed length on the device.
    from types import SimpleNamespace

    from edgespec.spec import TreeSettings
    from edgespec.spec.drafter import TargetStates

    logits = torch.zeros(64)
    settings = TreeSettings(12, 4, 3)
    host_only = SimpleNamespace(name="host-only", cache=cache, committed=0)
    with pytest.raises(ValueError, match="drafter 'host-only' cannot run its steps from a device-side committed"):
        cuda_graphs.DraftGraph(host_only, settings, 64, logits, None, record=False)
    with pytest.raises(ValueError, match="need a CUDA drafter"):
        cuda_graphs.DraftGraph(host_only, settings, 64, logits, None)
    able = SimpleNamespace(name="able", cache=cache, committed=0, graphable=True)
    with pytest.raises(ValueError, match=r"a catch-up of 3 tokens needs a view in \[3, 128\] draft-cache slots, got 2"):
        cuda_graphs.CatchUpGraph(able, 2, torch.zeros(3, dtype=torch.int64), TargetStates({}), record=False)
    with pytest.raises(ValueError, match=r"view must be in \[9, 128\] draft-cache slots, got 8"):
        cuda_graphs.DraftGraph(able, settings, 8, logits, None, record=False)
    able.committed = 120
    with pytest.raises(IndexError, match="draft KV cache overflow: a tree needs 129 slots of a cache of 128"):
        cuda_graphs.StepGraphs(model, model.new_cache(), record=False).grow(able, settings, logits, None)


def test_plain_steps_through_graph_buffers_give_the_eager_tokens(tiny_model_dir) -> None:
    """Decode steps through the one-row graphs' static buffers (record=False), crossing from the
    256-slot view to the whole cache, give eager decoding's tokens."""
    model = _model(tiny_model_dir, max_context=400)

    def buffered(m, c):
        strategy = PlainDecoding(m, c)
        strategy._graph = cuda_graphs.StepGraphs(m, c, record=False)
        return strategy

    prompt = [5, 17, 23, 42, 8, 99, 150, 3]
    want = LLM(LoadedModel(model, None, "m")).generate(prompt, max_new_tokens=300, ignore_eos=True, logprobs=2)
    llm = LLM(LoadedModel(model, None, "m"), strategy=buffered)
    got = llm.generate(prompt, max_new_tokens=300, ignore_eos=True, logprobs=2)
    assert got.token_ids == want.token_ids
    assert got.logprobs == want.logprobs  # read from the step's buffer before the next step overwrites it
    span = llm.cache.attention_span  # 8 + 300 slots: min(1024, the cache)
    assert sorted(cuda_graphs._GRAPHS[llm.cache]) == [(256, 1, False, (), None, span), (400, 1, False, (), None, span)]


def _speculative_llm(tiny_model_dir, tmp_path, device="cpu", dtype=torch.float32, drafter="eagle"):
    """A random target with an EAGLE-1/2 or EAGLE-3 head, or with a smaller random model of its
    vocabulary as the draft."""
    from edgespec.spec import ModelDrafter, enable_speculation
    from edgespec.spec.train_head import random_head

    model = _model(tiny_model_dir, device=device, dtype=dtype, max_context=400, vocab_size=64)
    llm = LLM(LoadedModel(model, None, "m"))
    llm.prefix_caching = False  # the tests compare runs of one prompt bit for bit (conftest.full_prefills)
    if drafter == "eagle":
        draft = random_head(model.config, tmp_path / "head", seed=1, std=0.4)
    elif drafter == "eagle3":  # three fused target layers and a reduced draft vocabulary (token_map)
        from test_spec_helpers import eagle3_head

        draft = eagle3_head(model.config, tmp_path / "head3", seed=1, draft_vocab=40, layers=[0, 1, 2])
    else:
        small = tiny_model_dir("llama", seed=9, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=128, num_hidden_layers=1, max_position_embeddings=1024, vocab_size=64)
        draft = ModelDrafter(load_model(str(small), device=device, dtype=dtype, max_context=400,
                                        with_tokenizer=False).model)
    enable_speculation(llm, draft=draft if drafter == "model" else str(draft), tree_size=12, depth=4, topk=3)
    return llm


def _with_graphs(llm, record: bool, calls: list | None = None):
    """Install llm's speculative strategy with step graphs (record=False: run eagerly); `calls`
    collects ("verify", rows), ("grow", committed) and ("catch-up", tokens) per graph use."""
    inner = llm._strategy_factory

    def make(model, cache):
        strategy = inner(model, cache)
        graphs = strategy.graphs = cuda_graphs.StepGraphs(model, cache, record=record)
        if calls is not None:
            verify, grow, catch_up = graphs.verify, graphs.grow, graphs.catch_up
            graphs.verify = lambda *a, **kw: calls.append(("verify", a[0].shape[0])) or verify(*a, **kw)
            graphs.grow = lambda d, *a: calls.append(("grow", d.committed)) or grow(d, *a)
            graphs.catch_up = lambda d, t, *a: calls.append(("catch-up", t.numel())) or catch_up(d, t, *a)
        return strategy

    make.drafter, make.settings = inner.drafter, inner.settings
    llm.set_strategy(make, cache_slack=llm.cache.max_len - llm.model.max_context)


@pytest.mark.parametrize("drafter", ["eagle", "eagle3", "model"])
def test_draft_rounds_read_the_committed_length_only_on_the_device(tiny_model_dir, tmp_path, drafter) -> None:
    """The draft rounds of a DraftGraph, run with the drafter's host-side committed length set to
    nonsense (what a replay would see if a capture had baked a host value in), grow the tree that
    build_tree grows at the true length, step after step."""
    from edgespec.generation import GenerationConfig
    from edgespec.spec.tree import build_tree, select_tree

    llm = _speculative_llm(tiny_model_dir, tmp_path, drafter=drafter)
    strategy = llm._strategy_factory(llm.model, llm.cache)
    d, settings = strategy.drafter, strategy.settings
    strategy.begin([5, 17, 23, 42, 8, 59, 3], GenerationConfig(max_new_tokens=40), 40)
    graphs: dict[int, cuda_graphs.DraftGraph] = {}
    for _ in range(6):
        want = build_tree(strategy._root, strategy._root_logits, strategy._root_state, d.expand, settings,
                          d.lm_head.token_map)
        true = d.committed
        view = cuda_graphs.view_bucket(true + cuda_graphs.DraftGraph.slots_written(settings, 64), d.cache.max_len)
        if view not in graphs:
            graphs[view] = cuda_graphs.DraftGraph(d, settings, view, strategy._root_logits, strategy._root_state,
                                                  record=False)
        g = graphs[view]
        g.root_logits.copy_(strategy._root_logits)
        if g.root_state is not None:
            g.root_state.copy_(strategy._root_state)
        g.committed.fill_(true)
        d._committed = 10**6
        try:
            got = select_tree(strategy._root, g._rounds(), settings.tree_size)
        finally:
            d._committed = true
        assert (got.tokens, got.parents) == (want.tokens, want.parents)
        torch.testing.assert_close(torch.tensor(got.scores), torch.tensor(want.scores))
        # The same through grow(), which fills the inputs itself.
        again = select_tree(strategy._root, g.grow(strategy._root_logits, strategy._root_state), settings.tree_size)
        assert (again.tokens, again.parents) == (want.tokens, want.parents)
        torch.testing.assert_close(torch.tensor(again.scores), torch.tensor(want.scores))
        strategy.step()


@pytest.mark.parametrize("drafter", ["eagle", "eagle3", "model"])
def test_draft_catch_up_reads_the_committed_length_only_on_the_device(tiny_model_dir, tmp_path, drafter) -> None:
    """A CatchUpGraph's pass, run with the drafter's host-side length set to nonsense, gives the
    logits, state and draft K/V of the drafter's eager advance() from the same state."""
    from edgespec.generation import GenerationConfig
    from edgespec.spec.drafter import TargetStates

    llm = _speculative_llm(tiny_model_dir, tmp_path, drafter=drafter)
    strategy = llm._strategy_factory(llm.model, llm.cache)
    d = strategy.drafter
    strategy.begin([5, 17, 23, 42, 8, 59, 3], GenerationConfig(max_new_tokens=40), 40)
    for _ in range(2):
        strategy.step()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 64, (3,), generator=g)
    target = TargetStates({i: torch.randn(3, 256, generator=g) for i in d.capture})
    true, k0, v0 = d.committed, d.cache.k.clone(), d.cache.v.clone()
    want_logits, want_state = d.advance(tokens, target)
    want_k, want_v = d.cache.k[:, :true + 3].clone(), d.cache.v[:, :true + 3].clone()
    d.cache.k.copy_(k0)
    d.cache.v.copy_(v0)
    d._committed = true
    graph = cuda_graphs.CatchUpGraph(d, 128, tokens, target, record=False)
    graph.tokens.copy_(tokens)
    for i, t in target.captured.items():
        graph.target.captured[i].copy_(t)
    graph.committed.fill_(true)
    d._committed = 10**6
    try:
        logits, state = graph._pass()
    finally:
        d._committed = true
    torch.testing.assert_close(logits, want_logits)
    assert (state is None) == (want_state is None) and (state is None or torch.allclose(state, want_state))
    torch.testing.assert_close(d.cache.k[:, :true + 3], want_k)
    torch.testing.assert_close(d.cache.v[:, :true + 3], want_v)
    # run() fills the inputs itself and counts the tokens on the host.
    again, _ = graph.run(tokens, target)
    torch.testing.assert_close(again, want_logits)
    assert d.committed == true + 3


@pytest.mark.parametrize("drafter", ["eagle", "eagle3", "model"])
def test_speculative_steps_through_graph_buffers_give_the_eager_tokens(tiny_model_dir, tmp_path, drafter) -> None:
    """Greedy and sampled speculative generations whose full-depth draft rounds and full-tree
    verifications run through the graphs' static buffers (record=False) commit exactly the eager
    strategy's tokens (whose CPU draft rounds may also stop early: the same trees); trees cut
    short at the end of the generation run eagerly."""
    llm = _speculative_llm(tiny_model_dir, tmp_path, drafter=drafter)
    prompt = [5, 17, 23, 42, 8, 59, 3]
    kwargs = [dict(max_new_tokens=40, ignore_eos=True, logprobs=2),
              dict(max_new_tokens=40, ignore_eos=True, temperature=0.8, seed=4)]
    eager = [llm.generate(prompt, **kw) for kw in kwargs]
    calls: list[tuple[str, int]] = []
    _with_graphs(llm, record=False, calls=calls)
    for kw, want in zip(kwargs, eager):
        got = llm.generate(prompt, **kw)
        # The tokens are the target's whatever the draft proposes; the acceptance shows the drafts.
        assert got.token_ids == want.token_ids
        assert got.logprobs == want.logprobs  # rows of the verify buffer, gathered before the next step
        assert got.stats.extra["acceptance_histogram"] == want.stats.extra["acceptance_histogram"]
    assert {rows for kind, rows in calls if kind == "verify"} == {13}, calls
    assert sum(kind == "grow" for kind, _ in calls) > 5, calls
    assert len({n for kind, n in calls if kind == "catch-up"}) > 1, "catch-ups of several lengths"


def test_steps_with_a_lookup_chain_leave_the_graphs(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """A step whose prompt-lookup chain matched drafts and verifies eagerly (its tree is larger than
    the captured one); the others go through the graphs, and the tokens are the eager strategy's."""
    from edgespec.spec import decoding, enable_speculation

    llm = _speculative_llm(tiny_model_dir, tmp_path)
    enable_speculation(llm, draft=llm._strategy_factory.drafter, tree_size=12, depth=4, topk=3, lookup=6)
    prompt = [5, 17, 23, 42, 8, 59, 3] * 3  # repeats: chains to graft
    eager = llm.generate(prompt, max_new_tokens=40, ignore_eos=True)
    calls: list[tuple[str, int]] = []
    _with_graphs(llm, record=False, calls=calls)
    chains: list = []
    lookup_chain = decoding.SpeculativeDecoding._lookup_chain
    monkeypatch.setattr(decoding.SpeculativeDecoding, "_lookup_chain",
                        lambda self, *a: chains.append(lookup_chain(self, *a)) or chains[-1])
    got = llm.generate(prompt, max_new_tokens=40, ignore_eos=True)
    assert got.token_ids == eager.token_ids and got.stats.extra == eager.stats.extra
    grafted = sum(c is not None for c in chains)
    grows = sum(kind == "grow" for kind, _ in calls)
    # Every step either grew its tree through the graphs, grafted a chain, or ran short at the end.
    assert grafted > 0 and grows > 0 and grows + grafted <= len(chains), (calls, chains)


def test_cli_option_turns_graphs_on_for_cuda_models_only(monkeypatch) -> None:
    from types import SimpleNamespace

    from edgespec.cli import build_parser
    from edgespec.cli.graph_options import setup_graphs

    monkeypatch.setenv("EDGESPEC_CUDA_GRAPHS", "0")  # restored after the test, whatever setup_graphs sets
    args = build_parser().parse_args(["generate", "--model", "demo", "--cuda-graphs", "hello"])
    assert args.cuda_graphs and not build_parser().parse_args(["generate", "--model", "demo", "hi"]).cuda_graphs
    cpu = SimpleNamespace(name="tiny", model=SimpleNamespace(device=torch.device("cpu"), sparse=None))
    with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA device; tiny runs on cpu"):
        setup_graphs(cpu, args)
    assert not cuda_graphs.requested()
    setup_graphs(SimpleNamespace(name="m", model=SimpleNamespace(device=torch.device("cuda"))), args)
    assert cuda_graphs.requested()


@pytest.mark.gpu
@pytest.mark.parametrize("sm90", [False, True], ids=["generic", "sm90"])
def test_graph_decoding_matches_eager_decoding_on_a_gpu(tiny_model_dir, sm90, monkeypatch) -> None:
    """Greedy tokens of 300 graph-replayed steps (crossing from the 256-slot view to the 512-slot
    one) equal eager decoding's, twice (the graphs are kept per cache and reused); sm90: the
    decode steps on the Hopper kernels' row-invariant mode, captured."""
    use_attention_family(sm90, torch.device("cuda"), monkeypatch)
    model = _model(tiny_model_dir, device="cuda", dtype=torch.bfloat16, max_context=640)
    prompt = [5, 17, 23, 42, 8, 99, 150, 3]
    eager = LLM(LoadedModel(model, None, "eager"), strategy=lambda m, c: PlainDecoding(m, c, cuda_graph=False))
    graphed = LLM(LoadedModel(model, None, "graphed"), strategy=lambda m, c: PlainDecoding(m, c, cuda_graph=True))
    want = eager.generate(prompt, max_new_tokens=300, ignore_eos=True).token_ids
    for _ in range(2):
        assert graphed.generate(prompt, max_new_tokens=300, ignore_eos=True).token_ids == want
    assert sorted(cuda_graphs._GRAPHS[graphed.cache]) == [(256, 1, False, (), None), (512, 1, False, (), None)]


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


@pytest.mark.gpu
@pytest.mark.parametrize("drafter, sm90", [("eagle", False), ("eagle3", False), ("model", False), ("eagle", True)],
                         ids=["eagle", "eagle3", "model", "eagle-sm90"])
def test_graph_speculation_matches_its_eager_run_on_a_gpu(tiny_model_dir, tmp_path, drafter, sm90,
                                                          monkeypatch) -> None:
    """Speculative generations whose draft rounds and full-tree verifications replay CUDA graphs
    commit the tokens, with the same acceptance, of the same static-buffer steps run eagerly (the
    same kernels and split plans, so the same bits), twice (graphs kept per cache), for greedy and
    sampled decoding; sm90: the target's steps on the Hopper kernels' row-invariant mode."""
    use_attention_family(sm90, torch.device("cuda"), monkeypatch)
    llm = _speculative_llm(tiny_model_dir, tmp_path, device="cuda", dtype=torch.bfloat16, drafter=drafter)
    prompt = [5, 17, 23, 42, 8, 59, 3]
    kwargs = [dict(max_new_tokens=300, ignore_eos=True, logprobs=2),
              dict(max_new_tokens=60, ignore_eos=True, temperature=0.8, seed=4)]
    _with_graphs(llm, record=False)
    want = [llm.generate(prompt, **kw) for kw in kwargs]
    calls: list[tuple[str, int]] = []
    _with_graphs(llm, record=True, calls=calls)
    for _ in range(2):
        for kw, ref in zip(kwargs, want):
            got = llm.generate(prompt, **kw)
            assert got.token_ids == ref.token_ids
            assert got.logprobs == ref.logprobs  # rows of the verify graph's output buffer
            assert got.stats.extra["acceptance_histogram"] == ref.stats.extra["acceptance_histogram"]
    assert {rows for kind, rows in calls if kind == "verify"} == {13}
    assert any(kind == "grow" for kind, _ in calls) and any(kind == "catch-up" for kind, _ in calls)
    # 300 tokens cross from the 256-slot view to the whole cache (max_context + the tree slack).
    assert {key[:3] for key in cuda_graphs._GRAPHS[llm.cache]} >= {(256, 13, True), (llm.cache.max_len, 13, True)}


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_ops")
@pytest.mark.parametrize("sampled", [False, True])
def test_a_graphed_speculative_step_reads_the_host_once(tiny_model_dir, tmp_path, monkeypatch, sampled) -> None:
    """DESIGN.md: no host synchronisation inside a speculative step beyond reading the accepted
    length. Through the graphs' buffers (record=False), with the ops on the (emulated) kernels as
    on a GPU, a step converts exactly one tensor to Python values (the accepted path, its tokens
    and the bonus), for greedy and sampled acceptance."""
    import traceback

    from edgespec.generation import GenerationConfig

    llm = _speculative_llm(tiny_model_dir, tmp_path, dtype=torch.bfloat16)
    _with_graphs(llm, record=False)
    strategy = llm._strategy_factory(llm.model, llm.cache)
    config = GenerationConfig(max_new_tokens=40, temperature=0.8 if sampled else 0.0, seed=3)
    strategy.begin([5, 17, 23, 42, 8, 59, 3], config, 40)
    reads: list[tuple[str, str]] = []  # (method, where it was called)
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            where = " < ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in traceback.extract_stack()[-2:-6:-1])
            reads.append((_name, where))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for _ in range(3):
        reads.clear()
        strategy.step()
        assert [name for name, _ in reads] == ["tolist"], reads
