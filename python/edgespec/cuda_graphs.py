"""CUDA graphs for plain decoding: the one-token step captured once per KV cache, replayed per token.

A decode step launches about ten kernels per layer. For a small model on a fast GPU the launches,
not the math, set the time per token, and a graph replays them all with one launch. One graph
serves every step because nothing in it is read on the host: the token, its RoPE position and
its cache slot live in device tensors that each replay reads (Decoder.forward with a tensor
`start` writes the K/V with index_copy_ and gives the attention kernel a device-side length over a
view of the whole cache). The attention split plan therefore follows the cache's capacity, not the
current length.

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

_GRAPHS: "weakref.WeakKeyDictionary[KVCache, DecodeGraph]" = weakref.WeakKeyDictionary()


def requested() -> bool:
    """Whether EDGESPEC_CUDA_GRAPHS asks for decode graphs."""
    value = os.environ.get("EDGESPEC_CUDA_GRAPHS", "0")
    if value not in ("0", "1"):
        raise ValueError(f"EDGESPEC_CUDA_GRAPHS must be 0 or 1, got {value!r}")
    return value == "1"


class DecodeGraph:
    """Decoder.forward + logits of one token, captured for `cache`; call it once per decode step.

    The warm-up runs (allocations, the kernels' shared-memory attributes) and the capture write
    their K/V at the cache's last slot with position 0, which holds nothing yet (a generation that
    reaches it overwrites it first).
    """

    def __init__(self, model: Decoder, cache: KVCache) -> None:
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}")
        if model.sparse is not None:
            raise ValueError("CUDA graphs need dense attention; this model has an InfLLM-v2 sparse_config")
        self.model = model
        self.cache = cache
        dev = model.device
        self.token = torch.zeros(1, dtype=torch.int64, device=dev)
        self.position = torch.zeros(1, dtype=torch.int64, device=dev)
        self.slot = torch.full((1,), cache.max_len - 1, dtype=torch.int64, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.logits = self._step()  # [1, V] fp32, rewritten by every replay
        # Layers that keep host-side step counts (BlockFFN's sparsity statistics): a replay runs no
        # Python, so __call__ counts for them.
        self._counted = [layer.ffn for layer in model.layers if hasattr(layer.ffn, "count_step")]

    def _step(self) -> torch.Tensor:
        out = self.model.forward(self.token, self.position, self.cache, self.slot)
        return self.model.logits(out.hidden)

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, V] of `token` at RoPE position and cache slot `position` (valid until the next call)."""
        if not 0 <= position < self.cache.max_len:
            raise IndexError(f"KV cache overflow: slot {position} of a cache of {self.cache.max_len}")
        self.token.fill_(token)
        self.position.fill_(position)
        self.slot.fill_(position)
        self.graph.replay()
        for ffn in self._counted:
            ffn.count_step(1)
        return self.logits


def decode_graph(model: Decoder, cache: KVCache) -> DecodeGraph:
    """The DecodeGraph of (model, cache), captured on first use and kept while the cache lives."""
    graph = _GRAPHS.get(cache)
    if graph is None or graph.model is not model:
        graph = DecodeGraph(model, cache)
        _GRAPHS[cache] = graph
    return graph
