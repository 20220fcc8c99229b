"""CUDA graphs for plain decoding: the one-token step captured per cache-length bucket, replayed per token.

A decode step launches about ten kernels per layer. For a small model on a fast GPU the launches,
not the math, set the time per token, and a graph replays them all with one launch. One graph
serves every step of its bucket because nothing in it is read on the host: the token, its RoPE position and
its cache slot live in device tensors that each replay reads (Decoder.forward with a tensor
`start` writes the K/V with index_copy_ and gives the attention kernel a device-side length over a
fixed view of the cache). The attention kernel plans its key-range splits for the view, so one
graph is captured per length bucket (views of 256, 512, 1024, ... slots, and the whole cache):
a short context never pays for the splits of a long one.

Opt-in (EDGESPEC_CUDA_GRAPHS=1, or PlainDecoding(cuda_graph=True)) until it has been measured and
checked on a GPU (tests/test_cuda_graphs.py, `gpu` marker). Needs a CUDA model whose ops all take
their kernel path without a host read: dense attention (no InfLLM-v2 sparse_config), the extension
built, and shapes the kernels take (a step that falls back to a torch path with a host read fails
the capture, which raises).
"""
from __future__ import annotations

import os
import weakref

import torch

from .kv_cache import KVCache
from .models.decoder import Decoder

_GRAPHS: "weakref.WeakKeyDictionary[KVCache, dict[int, DecodeGraph]]" = weakref.WeakKeyDictionary()
SMALLEST_VIEW = 256


def view_bucket(slots: int, max_len: int) -> int:
    """The cache view a step that needs `slots` slots runs with: the smallest power of two from
    SMALLEST_VIEW on that holds them, or the whole cache."""
    view = SMALLEST_VIEW
    while view < slots:
        view *= 2
    return min(view, max_len)


def requested() -> bool:
    """Whether EDGESPEC_CUDA_GRAPHS asks for decode graphs."""
    value = os.environ.get("EDGESPEC_CUDA_GRAPHS", "0")
    if value not in ("0", "1"):
        raise ValueError(f"EDGESPEC_CUDA_GRAPHS must be 0 or 1, got {value!r}")
    return value == "1"


class DecodeGraph:
    """Decoder.forward + logits of one token over the first `view` slots of `cache`, captured once;
    call it per decode step whose slot is below `view`.

    The warm-up runs (allocations, the kernels' shared-memory attributes) and the capture write
    their K/V at slot view - 1 with position 0. It is captured when a generation first needs this
    view, so that slot holds nothing yet (the generation overwrites it when it gets there).
    """

    def __init__(self, model: Decoder, cache: KVCache, view: int) -> None:
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}")
        if model.sparse is not None:
            raise ValueError("CUDA graphs need dense attention; this model has an InfLLM-v2 sparse_config")
        if not 0 < view <= cache.max_len:
            raise ValueError(f"view must be in [1, {cache.max_len}] cache slots, got {view}")
        self.model = model
        self.cache = cache
        self.view = view
        dev = model.device
        self.token = torch.zeros(1, dtype=torch.int64, device=dev)
        self.position = torch.zeros(1, dtype=torch.int64, device=dev)
        self.slot = torch.full((1,), view - 1, dtype=torch.int64, device=dev)
        # Layers that keep host-side statistics (BlockFFN's sparsity): the warm-up steps must not
        # count, and a replay runs no Python, so __call__ counts for them.
        self._counted = [layer.ffn for layer in model.layers if hasattr(layer.ffn, "count_step")]
        saved = [ffn.snapshot_stats() for ffn in self._counted]
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), torch.cuda.graph(self.graph):
                self.logits = self._step()  # [1, V] fp32, rewritten by every replay
        except RuntimeError as exc:  # e.g. an op fell back to a torch path that reads the GPU from the host
            raise RuntimeError(f"capturing the decode step as a CUDA graph failed ({exc}); every op must take "
                               "its kernel path without a host read: run without EDGESPEC_CUDA_GRAPHS "
                               "for this model") from exc
        for ffn, snapshot in zip(self._counted, saved):
            ffn.restore_stats(snapshot)

    def _step(self) -> torch.Tensor:
        out = self.model.forward(self.token, self.position, self.cache, self.slot, cache_view=self.view)
        return self.model.logits(out.hidden)

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, V] of `token` at RoPE position and cache slot `position` (valid until the next call)."""
        if not 0 <= position < self.view:
            raise IndexError(f"slot {position} is outside this graph's view of {self.view} cache slots")
        self.token.fill_(token)
        self.position.fill_(position)
        self.slot.fill_(position)
        self.graph.replay()
        for ffn in self._counted:
            ffn.count_step(1)
        return self.logits


class DecodeGraphs:
    """The decode graphs of (model, cache), one per view bucket, each captured when a step first
    needs it and kept while the cache lives (shared by every generation on that cache)."""

    def __init__(self, model: Decoder, cache: KVCache) -> None:
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}")
        if model.sparse is not None:
            raise ValueError("CUDA graphs need dense attention; this model has an InfLLM-v2 sparse_config")
        self.model = model
        self.cache = cache
        graphs = _GRAPHS.setdefault(cache, {})
        if any(g.model is not model for g in graphs.values()):
            graphs.clear()  # the cache now serves another model
        self.graphs = graphs

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, V] of `token` at RoPE position and cache slot `position` (valid until the next call)."""
        if not 0 <= position < self.cache.max_len:
            raise IndexError(f"KV cache overflow: slot {position} of a cache of {self.cache.max_len}")
        view = view_bucket(position + 1, self.cache.max_len)
        graph = self.graphs.get(view)
        if graph is None:
            graph = self.graphs[view] = DecodeGraph(self.model, self.cache, view)
        return graph(token, position)
