"""CUDA graphs for the steps of plain and speculative decoding: a decode step, the verification of
a draft tree, the draft rounds that grow it and the drafter's catch-up, each captured per
cache-length bucket (and shape) and replayed per step.

A step launches about ten kernels per layer. For a small model on a fast GPU the launches, not the
math, set the time per token, and a graph replays them all with one launch. This matters twice
for speculative decoding: its verification pass is as launch-bound as a decode step, and once
plain decoding replays graphs, a speculative step that does not would lose to it.

One graph serves every step of its bucket because nothing in it is read on the host: the tokens,
their RoPE positions, the first cache slot and the tree mask live in device tensors that each
replay reads (Decoder.forward with a tensor `start` writes the K/V with index_copy_ and gives the
attention kernel a device-side length over a fixed view of the cache). The attention kernel plans
its key-range splits for the view, so one graph is captured per length bucket (views of 256, 512,
1024, ... slots, and the whole cache): a short context never pays for the splits of a long one.
A graph has a fixed number of rows: speculative decoding replays one only for full trees
(tree_size + 1 nodes, the usual case) and runs smaller ones (the last steps of a generation)
eagerly, so no padding rows reach BlockFFN's sparsity statistics.

The draft side has two: a DraftGraph holds all draft rounds of a full-depth tree
(spec.tree.grow_candidates: a draft forward, top-k and the tree bookkeeping per depth, about 40
launches each) per draft-cache view, and a CatchUpGraph the drafter's pass over the tokens a step
committed (one per count: 1 to depth + 1), both with the drafter's committed length as a device
input. Between the graphs the tree stays on the device too (spec.tree.select_tree_on_device feeds
the verification), and so does the acceptance, greedy or sampled (spec.accept's *_on_device): a
step reads the host once, for the accepted path and the bonus token, as DESIGN.md asks.

InfLLM-v2 sparse attention (MiniCPM4) is graphed too: whether a step is sparse is decided on the
host (its length against dense_len) and selects the graph; a sparse step finds the lengths of its
compressed-key update and block selection in a small device buffer of the cache's SparseState,
which the host fills before each replay (models.sparse.SparseAttention.prepare_device_step). A
draft *model* with a sparse_config drafts eagerly (its rounds would need that per draft forward).

Opt-in (EDGESPEC_CUDA_GRAPHS=1, or PlainDecoding/SpeculativeDecoding(cuda_graph=True)) until it
has been measured and checked on a GPU (tests/test_cuda_graphs.py, `gpu` marker). Needs a CUDA
model whose ops all take their kernel path without a host read: the extension built, and shapes
the kernels take (a step that falls back to a torch path with a host read fails the capture,
which raises).
"""
from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch

from .kv_cache import KVCache
from .models.decoder import Decoder
from .ops.attention import pack_tree_mask

if TYPE_CHECKING:  # edgespec.spec imports generation, which imports this module
    from .spec.drafter import TargetStates
    from .spec.tree import Candidates, TreeSettings

# Graphs per KV cache they write: a target cache's StepGraphs keyed (view, rows, tree mask?,
# captured layers, first sparse length or None, the generation's attention span: it sets the
# invariant attention's chunks); a draft cache's DraftGraphs keyed ("draft", view, settings, LM head) and
# CatchUpGraphs keyed ("catch-up", view, tokens, captured layers).
_GRAPHS: "weakref.WeakKeyDictionary[KVCache, dict[tuple, Any]]" = weakref.WeakKeyDictionary()
SMALLEST_VIEW = 256


def view_bucket(slots: int, max_len: int) -> int:
    """The cache view a step that needs `slots` slots runs with: the smallest power of two from
    SMALLEST_VIEW on that holds them, or the whole cache."""
    view = SMALLEST_VIEW
    while view < slots:
        view *= 2
    return min(view, max_len)


def requested() -> bool:
    """Whether EDGESPEC_CUDA_GRAPHS asks for step graphs."""
    value = os.environ.get("EDGESPEC_CUDA_GRAPHS", "0")
    if value not in ("0", "1"):
        raise ValueError(f"EDGESPEC_CUDA_GRAPHS must be 0 or 1, got {value!r}")
    return value == "1"


def _capture(step: Callable[[], Any], device: torch.device, what: str) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm `step` up twice on a side stream (allocations, the kernels' shared-memory attributes),
    then capture it; returns the graph and the outputs of the captured run, which every replay
    rewrites in place."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.inference_mode(), torch.cuda.graph(graph):
            outputs = step()
    except RuntimeError as exc:  # e.g. an op fell back to a torch path that reads the GPU from the host
        raise RuntimeError(f"capturing {what} as a CUDA graph failed ({exc}); every op must take its kernel "
                           "path without a host read: run without EDGESPEC_CUDA_GRAPHS for this model") from exc
    return graph, outputs


def _graphs_of(cache: KVCache, owner: Any, record: bool) -> dict[tuple, Any]:
    """The graphs kept for `cache`, emptied first when another model/drafter (or the other
    record mode) made them: the cache now serves someone else."""
    graphs = _GRAPHS.setdefault(cache, {})
    if any(g.owner is not owner or (g.graph is not None) != record for g in graphs.values()):
        graphs.clear()
    return graphs


def _graph_for(graphs: dict[tuple, Any], cache: KVCache, need: int, what: str,
               key: Callable[[int], tuple], make: Callable[[int], Any]) -> Any:
    """The graph in `graphs` for a step that needs the first `need` slots of `cache`: the one of
    its view bucket, keyed key(view) and made by make(view) on first use."""
    if need > cache.max_len:
        raise IndexError(f"{what} needs {need} slots of a cache of {cache.max_len}")
    view = view_bucket(need, cache.max_len)
    graph = graphs.get(key(view))
    if graph is None:
        graph = graphs[key(view)] = make(view)
    return graph


def _check_model(model: Decoder, record: bool) -> None:
    if record and model.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}")


class StepGraph:
    """Decoder.forward + logits of `rows` tokens over the first `view` slots of `cache`, captured
    once; `decode` / `verify` run it for a step whose slots lie below `view`.

    tree=False: a causal step (decode: rows = 1); tree=True: a draft tree whose packed mask is an
    input like the tokens. capture: layers whose input residual stream the step also returns (the
    drafter's features). sparse: a step of a model with an InfLLM-v2 sparse_config that runs
    sparse (SparseAttention.active at its length; StepGraphs keeps one graph for each side of
    dense_len): the compressed keys are brought up to date and the blocks selected on the device,
    from lengths the host writes into the cache's SparseState before each replay.

    The warm-up runs (allocations, the kernels' shared-memory attributes) and the capture write
    their K/V at slots [view - rows, view) with position 0. A graph is captured when a generation
    first needs its view, so those slots hold nothing yet (the generation overwrites them when it
    gets there).

    record=False keeps the static buffers but runs the step eagerly at every call instead of
    replaying a capture: the CPU tests check the plumbing this way, and on a GPU it tells a capture
    problem from a plumbing one.
    """

    def __init__(self, model: Decoder, cache: KVCache, view: int, rows: int = 1, tree: bool = False,
                 capture: tuple[int, ...] = (), record: bool = True, sparse: bool = False) -> None:
        _check_model(model, record)
        if sparse and model.sparse is None:
            raise ValueError("a sparse step graph needs a model with an InfLLM-v2 sparse_config")
        if not 0 < view <= cache.max_len:
            raise ValueError(f"view must be in [1, {cache.max_len}] cache slots, got {view}")
        if not 0 < rows <= view:
            raise ValueError(f"rows must be in [1, view = {view}], got {rows}")
        self.model = self.owner = model
        self.cache = cache
        self.view = view
        self.rows = rows
        self.capture = tuple(capture)
        self.sparse = sparse
        # The host decisions a sparse step bakes in: the graph serves only while they hold.
        self._dense_len = model.sparse.dense_len() if sparse and model.sparse is not None else None
        dev = model.device
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.start = torch.full((1,), view - rows, dtype=torch.int64, device=dev)
        # A chain until the first verify fills in a real tree: any valid mask serves the warm-up.
        self.mask = pack_tree_mask(torch.ones(rows, rows, dtype=torch.bool).tril()).to(dev) if tree else None
        # Layers that keep host-side statistics (BlockFFN's sparsity): the warm-up steps must not
        # count, and a replay runs no Python, so replay() counts for them.
        self._counted = [layer.ffn for layer in model.layers if hasattr(layer.ffn, "count_step")]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.captured: dict[int, torch.Tensor] = {}
        if record:
            self._record()

    def _record(self) -> None:
        if self.sparse:  # the warm-up and capture runs then compress no keys (empty ranges)
            assert self.model.sparse is not None
            self.model.sparse.state(self.cache).ranges.zero_()
        saved = [ffn.snapshot_stats() for ffn in self._counted]
        self.graph, (self.logits, self.captured) = _capture(self._step, self.model.device, f"a {self.rows}-row step")
        for ffn, snapshot in zip(self._counted, saved):
            ffn.restore_stats(snapshot)

    def _step(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        out = self.model.forward(self.tokens, self.positions, self.cache, self.start, tree_mask=self.mask,
                                 capture=self.capture, cache_view=self.view,
                                 sparse_active=None if self.model.sparse is None else self.sparse)
        return self.model.logits(out.hidden), out.captured

    def _run(self, first_slot: int) -> None:
        if not 0 <= first_slot <= self.view - self.rows:
            raise IndexError(f"slots [{first_slot}, {first_slot + self.rows}) are outside this graph's view of "
                             f"{self.view} cache slots")
        sparse = self.model.sparse
        if sparse is not None:
            if sparse.active(first_slot + self.rows) != self.sparse:
                raise ValueError(f"this graph was captured for {'sparse' if self.sparse else 'dense'} attention; a "
                                 f"step at slot {first_slot} is {'dense' if self.sparse else 'sparse'}")
            if self.sparse and sparse.dense_len() != self._dense_len:
                raise ValueError(f"this graph was captured for sparse attention from {self._dense_len} tokens on; "
                                 f"the model's sparse mode ({sparse.mode!r}) now says {sparse.dense_len()}")
            sparse.prepare_device_step(self.cache, first_slot, self.rows, self.mask is not None)
        self.start.fill_(first_slot)
        if self.graph is None:
            with torch.inference_mode():
                self.logits, self.captured = self._step()
            return  # the eager forward counted its own statistics
        self.graph.replay()
        for ffn in self._counted:
            ffn.count_step(self.rows)

    def decode(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, V] of `token` at RoPE position and cache slot `position` (valid until the next call)."""
        if self.rows != 1 or self.mask is not None:
            raise ValueError(f"decode needs a one-row causal graph, this one has {self.rows} rows"
                             f"{' and a tree mask' if self.mask is not None else ''}")
        self.tokens.fill_(token)
        self.positions.fill_(position)
        self._run(position)
        assert self.logits is not None
        return self.logits

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor, start: int,
               mask: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits [rows, V] and the captured streams of a draft tree (tokens, positions: int64
        [rows]; mask: packed int64 [rows, words]) at cache slots [start, start + rows); valid until
        the next call."""
        if self.mask is None:
            raise ValueError("verify needs a graph captured with a tree mask")
        for name, t, shape in (("tokens", tokens, (self.rows,)), ("positions", positions, (self.rows,)),
                               ("mask", mask, tuple(self.mask.shape))):
            if tuple(t.shape) != shape or t.dtype != torch.int64:
                raise ValueError(f"verify: {name} must be int64 {list(shape)} for this {self.rows}-row graph, "
                                 f"got {t.dtype} {list(t.shape)}")
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.mask.copy_(mask)
        self._run(start)
        assert self.logits is not None
        return self.logits, self.captured


class StepGraphs:
    """The step graphs of (model, cache), one per (view bucket, rows, mask, captured layers), and
    the draft graphs of a drafter's cache, each captured when a step first needs it and kept while
    its cache lives (shared by every generation on that cache). record=False: see StepGraph."""

    def __init__(self, model: Decoder, cache: KVCache, record: bool = True) -> None:
        _check_model(model, record)
        self.model = model
        self.cache = cache
        self.record = record
        self.graphs = _graphs_of(cache, model, record)

    def _graph(self, slots_needed: int, rows: int, tree: bool, capture: tuple[int, ...]) -> StepGraph:
        sparse = self.model.sparse is not None and self.model.sparse.active(slots_needed)
        # Keyed by the dense/sparse switch point too: a mode change must not reuse a sparse graph.
        sparse_from = self.model.sparse.dense_len() if sparse and self.model.sparse is not None else None
        return _graph_for(self.graphs, self.cache, slots_needed, "KV cache overflow: a step",
                          lambda view: (view, rows, tree, tuple(capture), sparse_from, self.cache.attention_span),
                          lambda view: StepGraph(self.model, self.cache, view, rows, tree, capture, self.record,
                                                 sparse))

    def decode(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, V] of `token` at RoPE position and cache slot `position` (valid until the next call)."""
        if position < 0:
            raise IndexError(f"cache slot {position} is negative")
        return self._graph(position + 1, 1, False, ()).decode(token, position)

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor, start: int, mask: torch.Tensor,
               capture: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """StepGraph.verify through the graph of this tree's row count and bucket."""
        if start < 0:
            raise IndexError(f"cache slot {start} is negative")
        return self._graph(start + tokens.shape[0], tokens.shape[0], True, capture).verify(tokens, positions, start, mask)

    def grow(self, drafter: Any, settings: TreeSettings, root_logits: torch.Tensor,
             root_state: torch.Tensor | None) -> Candidates:
        """spec.tree.grow_candidates to the full settings.depth through the graph of the drafter's
        cache bucket (the drafter must be graphable); valid until the next call."""
        cache = drafter.cache
        need = drafter.committed + DraftGraph.slots_written(settings, root_logits.shape[-1])
        graph = _graph_for(_graphs_of(cache, drafter, self.record), cache, need, "draft KV cache overflow: a tree",
                           lambda view: ("draft", view, settings, id(drafter.lm_head)),
                           lambda view: DraftGraph(drafter, settings, view, root_logits, root_state, self.record))
        return graph.grow(root_logits, root_state)

    def catch_up(self, drafter: Any, tokens: torch.Tensor,
                 target: TargetStates) -> tuple[torch.Tensor, torch.Tensor | None]:
        """drafter.advance(tokens, target) through the graph of this token count and bucket (the
        drafter must be graphable); valid until the next call."""
        cache = drafter.cache
        graph = _graph_for(_graphs_of(cache, drafter, self.record), cache, drafter.committed + tokens.numel(),
                           "draft KV cache overflow: a catch-up",
                           lambda view: ("catch-up", view, tokens.numel(), tuple(sorted(target.captured))),
                           lambda view: CatchUpGraph(drafter, view, tokens, target, self.record))
        return graph.run(tokens, target)


def _check_drafter(drafter: Any, device: torch.device, record: bool) -> None:
    if record and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA drafter, this one is on {device}")
    if not getattr(drafter, "graphable", False):
        raise ValueError(f"drafter {getattr(drafter, 'name', drafter)!r} cannot run its steps from a "
                         "device-side committed length (it is not graphable)")


class CatchUpGraph:
    """The drafter's pass over `rows` committed tokens (its advance()) over the first `view` slots of
    its cache, captured once; `run` replays it at the drafter's committed length and counts the
    tokens on the host. Inputs: the tokens and the target's captured streams at the positions
    before them (static buffers shaped like the first call's); outputs: the draft logits and state
    after the last token. Warm-up and capture write at the view's last `rows` slots.
    record=False: see StepGraph.
    """

    def __init__(self, drafter: Any, view: int, tokens: torch.Tensor, target: TargetStates,
                 record: bool = True) -> None:
        from .spec.drafter import TargetStates  # noqa: PLC0415 - see the TYPE_CHECKING import

        _check_drafter(drafter, tokens.device, record)
        rows = tokens.numel()
        if not 0 < rows <= view <= drafter.cache.max_len:
            raise ValueError(f"a catch-up of {rows} tokens needs a view in [{rows}, {drafter.cache.max_len}] "
                             f"draft-cache slots, got {view}")
        self.drafter = self.owner = drafter
        self.view = view
        self.rows = rows
        self.tokens = tokens.clone()
        self.target = TargetStates({i: t.clone().normal_() for i, t in target.captured.items()})
        self.committed = torch.full((1,), view - rows, dtype=torch.int64, device=tokens.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None
        if record:
            self.graph, self.outputs = _capture(self._pass, tokens.device, f"a {rows}-token draft catch-up")

    def _pass(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.drafter.catch_up(self.tokens, self.target, self.committed, self.view)

    def run(self, tokens: torch.Tensor, target: TargetStates) -> tuple[torch.Tensor, torch.Tensor | None]:
        committed = self.drafter.committed
        if tokens.shape != self.tokens.shape or sorted(target.captured) != sorted(self.target.captured):
            raise ValueError(f"catch-up graph of {self.rows} tokens and streams {sorted(self.target.captured)} got "
                             f"{tokens.numel()} tokens and streams {sorted(target.captured)}")
        if committed + self.rows > self.view:
            raise IndexError(f"a catch-up at committed length {committed} does not fit this graph's view of "
                             f"{self.view} draft-cache slots")
        self.tokens.copy_(tokens)
        for i, t in target.captured.items():
            self.target.captured[i].copy_(t)
        self.committed.fill_(committed)
        if self.graph is None:
            with torch.inference_mode():
                out = self._pass()
        else:
            self.graph.replay()
            assert self.outputs is not None
            out = self.outputs
        self.drafter.note_committed(self.rows)
        return out


class DraftGraph:
    """The draft rounds of a full-depth tree (spec.tree.grow_candidates with depth_limit =
    settings.depth, no early stop) over the first `view` slots of the drafter's cache, captured
    once; `grow` runs them for the drafter's current committed length.

    The inputs are the draft logits and state after the root (copied into static buffers shaped
    like the first call's) and the committed length (a device tensor every ExpandBatch carries);
    the output is the Candidates, for spec.tree.select_tree. The warm-up and capture write draft
    K/V at the last slots_written(...) slots of the view, which no committed position holds yet.
    record=False: see StepGraph.
    """

    def __init__(self, drafter: Any, settings: TreeSettings, view: int, root_logits: torch.Tensor,
                 root_state: torch.Tensor | None, record: bool = True) -> None:
        device = root_logits.device
        _check_drafter(drafter, device, record)
        rows = self.slots_written(settings, root_logits.shape[-1])
        if not rows <= view <= drafter.cache.max_len:
            raise ValueError(f"view must be in [{rows}, {drafter.cache.max_len}] draft-cache slots, got {view}")
        self.drafter = self.owner = drafter
        self.settings = settings
        self.view = view
        self.root_logits = torch.empty_like(root_logits)
        self.root_state = None if root_state is None else torch.empty_like(root_state)
        self.committed = torch.full((1,), view - rows, dtype=torch.int64, device=device)
        self.root_logits.normal_()  # any finite draft distribution serves the warm-up
        if self.root_state is not None:
            self.root_state.normal_()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.candidates: Candidates | None = None
        if record:
            self.graph, self.candidates = _capture(self._rounds, device, "the draft rounds")

    @staticmethod
    def slots_written(settings: TreeSettings, vocab: int) -> int:
        """Draft-cache slots past the committed length that a full-depth tree's rounds write: the
        recomputed rows of the last round (topk per depth below the deepest)."""
        return max(1, min(settings.topk, vocab) * (settings.depth - 1))

    def _rounds(self) -> Candidates:
        from .spec.tree import grow_candidates  # noqa: PLC0415 - see the TYPE_CHECKING import

        return grow_candidates(self.root_logits, self.root_state, self.drafter.expand, self.settings,
                               self.drafter.lm_head.token_map, self.settings.depth, stop_early=False,
                               committed=self.committed, cache_view=self.view)

    def grow(self, root_logits: torch.Tensor, root_state: torch.Tensor | None) -> Candidates:
        committed = self.drafter.committed
        if committed + self.slots_written(self.settings, root_logits.shape[-1]) > self.view:
            raise IndexError(f"a tree at committed length {committed} does not fit this graph's view of "
                             f"{self.view} draft-cache slots")
        self.root_logits.copy_(root_logits)
        if self.root_state is not None:
            self.root_state.copy_(root_state)
        self.committed.fill_(committed)
        if self.graph is None:
            with torch.inference_mode():
                return self._rounds()
        self.graph.replay()
        assert self.candidates is not None
        return self.candidates
