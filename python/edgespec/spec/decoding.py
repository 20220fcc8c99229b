"""The speculative decoding strategy: draft a tree, verify it in one target pass, accept, commit.

One step, with n committed tokens in the target's cache and the root r (the last committed token,
not yet run through the target) at position n:

    draft:   the drafter grows an EAGLE-2 tree of up to tree_size tokens below r (or, without a
             draft model, spec.ngram looks the tree up in the sequence itself); with
             settings.lookup, a prompt-lookup chain is grafted onto the draft model's tree
    verify:  one target forward over [r, tree...] at cache slots [n, n+T), positions n + depth,
             with the bit-packed tree mask                          -> logits [T, V]
    accept:  greedy (longest path of argmax matches) or lossless rejection sampling -> path, bonus
    commit:  the K/V of the path move to slots [n, n+len(path)) (KVCache.compact); the drafter
             catches up on the accepted tokens and the bonus, which becomes the next root.

Each step returns the accepted draft tokens plus the bonus: at least one token per target forward,
exactly the tokens plain decoding would produce (greedy) or with the same distribution (sampling).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch

from .. import cuda_graphs
from ..generation import (GenerationConfig, PromptScorer, Sampler, TokenLogprob, checked_tokens, full_grammar_masks,
                          prefill)
from ..kv_cache import KVCache
from ..models.decoder import Decoder
from .accept import (accept_constrained, accept_greedy, accept_greedy_on_device, accept_sampling,
                     accept_sampling_on_device)
from .drafter import Drafter, TargetStates
from .ngram import GRAFT_MIN_N, NgramDrafter
from .tree import DeviceTree, DraftTree, TreeSettings, build_tree, children_bound, select_tree_on_device


def cache_slack(settings: TreeSettings) -> int:
    """Cache slots a step may write past the committed length (the target verifies up to
    settings.verified tokens; the drafter's recomputed rounds hold at most topk * (depth - 1) rows)."""
    return max(settings.verified, settings.topk * settings.depth) + 1


class SpeculativeDecoding:
    """A DecodingStrategy (see edgespec.generation) that drafts with `drafter` and verifies trees.

    cuda_graph: replay the draft rounds of every full-depth tree, the verification of every full
    tree (tree_size + 1 nodes) and the drafter's catch-up as CUDA graphs (edgespec.cuda_graphs;
    None: as EDGESPEC_CUDA_GRAPHS says, and only for a CUDA model). A step that grafts a lookup
    chain drafts and verifies eagerly.
    lookup: the prompt-lookup drafter of settings.lookup (kept by the factory across generations,
    so a chat's next turn extends its copy of the sequence; None: a new one).
    """

    def __init__(self, model: Decoder, cache: KVCache, drafter: Drafter, settings: TreeSettings,
                 cuda_graph: bool | None = None, lookup: NgramDrafter | None = None) -> None:
        if cuda_graph is None:
            cuda_graph = cuda_graphs.requested() and model.device.type == "cuda"
        self.graphs = cuda_graphs.StepGraphs(model, cache) if cuda_graph else None
        self.model = model
        self.cache = cache
        self.drafter = drafter
        self.settings = settings.validate()
        if settings.lookup and hasattr(drafter, "draft_tree"):
            raise ValueError(f"settings.lookup grafts prompt lookup onto a draft model's trees; the {drafter.name} "
                             f"drafter makes its trees without one")
        self.lookup = (lookup or NgramDrafter(min_n=GRAFT_MIN_N)) if settings.lookup else None
        self.lookup_tokens = 0  # committed draft tokens that only the lookup chain proposed
        self.sampler: Sampler | None = None
        self._root = -1
        self._root_logits: torch.Tensor | None = None  # [Vd] draft logits after the root
        self._root_state: torch.Tensor | None = None   # [1, Hs]
        self._budget = 0
        self._produced = 0
        self.accept_lengths: Counter[int] = Counter()  # tokens committed per target forward -> steps
        self.tree_sizes: list[int] = []
        self.token_logits: torch.Tensor | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.cached_tokens = 0

    def begin(self, prompt_ids: Sequence[int], config: GenerationConfig, max_new_tokens: int,
              reuse: int = 0) -> list[int]:
        dev = self.model.device
        need = self.model.max_context + cache_slack(self.settings)
        if self.cache.max_len < need:
            raise ValueError(f"speculative decoding needs a KV cache of {need} slots, this one has "
                             f"{self.cache.max_len}: install it with LLM.set_strategy(..., cache_slack=...)")
        self.sampler = Sampler(config, dev, prompt_ids)
        self._budget = max_new_tokens
        self.drafter.reset(need)
        ids = torch.tensor(list(prompt_ids), dtype=torch.int64, device=dev)
        scorer = PromptScorer.maybe(self.model, ids, config, reuse)
        # With at most one new token no step follows (a scored prompt, a one-token answer): no drafting.
        drafting = max_new_tokens > 1
        # Prefix caching: the drafter keeps the slots it can (never more than the target), and the
        # target recomputes from there, since the drafter reads its states at those positions.
        start = min(reuse, self.drafter.reusable(prompt_ids)) if drafting else reuse
        self.cached_tokens = start
        hidden, captured = prefill(self.model, self.cache, ids, config.prefill_chunk,
                                   capture=self.drafter.capture if drafting else (), cancel=config.cancel,
                                   on_chunk=scorer, start=start)
        self.prompt_logprobs = scorer.result() if scorer is not None else None
        logits = self.model.logits(hidden)
        first = checked_tokens(self.sampler(logits), logits)[0]
        if config.constraint is not None:
            config.constraint.consume([first])
        self.token_logits = logits
        if drafting:
            target = TargetStates({i: torch.cat(parts) for i, parts in captured.items()})
            self.drafter.sequence = []  # until its slots hold this sequence
            self._root_logits, self._root_state = self.drafter.prefill(ids, first, target, start)
            self.drafter.sequence = list(prompt_ids) + [first]
        self._root = first
        self._produced = 1
        return [first]

    def step(self) -> list[int]:
        model, cache = self.model, self.cache
        dev = model.device
        n = cache.length
        # Nodes at depth d sit at position n + d: stay inside the context, and drafting deeper than
        # the tokens still wanted is wasted work.
        max_depth = min(model.max_context - 1 - n, self._budget - self._produced - 1)
        # A grammar masks each tree row by its node's path, which it reads from a host tree.
        constrained = self.sampler.config.constraint is not None
        pick = self.sampler.config.constraint.draft_choices if constrained else None
        chain = self._lookup_chain(max(max_depth, 0), pick)
        if (self.graphs is not None and max_depth >= self.settings.depth >= 2 and chain is None
                and getattr(self.drafter, "graphable", False) and not constrained):
            # Graphed drafting: the tree stays on the device until the acceptance reads its path.
            cands = self.graphs.grow(self.drafter, self.settings, self._root_logits, self._root_state)
            root = torch.full((1,), self._root, dtype=torch.int64, device=dev)
            k = children_bound(self.settings, self._root_logits.shape[-1])
            tree: DeviceTree | DraftTree = select_tree_on_device(root, cands, self.settings.tree_size,
                                                                 self.settings.depth, k)
        else:
            # Under a grammar, drafts it forbids give their places in the tree to ones it allows.
            if hasattr(self.drafter, "draft_tree"):  # a drafter that makes whole trees (spec.ngram)
                tree = self.drafter.draft_tree(self._root, self.settings, max(max_depth, 0), pick)
            else:
                tree = build_tree(self._root, self._root_logits, self._root_state, self.drafter.expand, self.settings,
                                  self.drafter.lm_head.token_map, max_depth=max(max_depth, 0), pick=pick)
        drafted = tree.size  # nodes from here on are the lookup chain's alone
        if chain is not None:
            tree = tree.graft(chain)
        if isinstance(tree, DeviceTree):
            tokens, positions, mask = tree.tokens, tree.positions(n), tree.mask
        else:
            tokens = torch.tensor(tree.tokens, dtype=torch.int64, device=dev)
            positions, mask = tree.positions(n, dev), tree.packed_mask(dev) if tree.size > 1 else None
        # A full tree runs as a graph, except one across a sparse model's dense_len (its dense rows
        # take the dense attention's bits there, which only the eager step does).
        crossing = model.sparse is not None and model.sparse.crosses_dense_len(n, tree.size)
        if self.graphs is not None and tree.size == self.settings.tree_size + 1 > 1 and not crossing:
            logits, captured = self.graphs.verify(tokens, positions, n, mask, self.drafter.capture)
        else:
            out = model.forward(tokens, positions, cache, n, tree_mask=mask, capture=self.drafter.capture)
            logits, captured = model.logits(out.hidden), out.captured       # [T, V] fp32
        path, path_tokens, bonus = self._accept(tree, logits)
        committed = path_tokens[1:] + [bonus]
        committed_t = torch.tensor(committed, dtype=torch.int64, device=dev)
        self.sampler.record(committed_t)
        path_t = torch.tensor(path, dtype=torch.int64, device=dev)
        # Path node i's row is the distribution committed token i was chosen from (the bonus's: the last node's).
        self.token_logits = logits.index_select(0, path_t) if self.sampler.config.logprobs is not None else None
        cache.compact([n + i for i in path], n)
        cache.length = n + len(path)
        target = TargetStates(captured).rows(path_t)
        if self.graphs is not None and getattr(self.drafter, "graphable", False):
            self._root_logits, self._root_state = self.graphs.catch_up(self.drafter, committed_t, target)
        else:
            self._root_logits, self._root_state = self.drafter.advance(committed_t, target)
        self.drafter.sequence.extend(committed)
        self._root = bonus
        self._produced += len(committed)
        self.lookup_tokens += sum(node >= drafted for node in path)
        self.accept_lengths[len(committed)] += 1
        self.tree_sizes.append(tree.size - 1)
        if constrained:  # the grammar follows; tokens a step committed past its end are dropped
            return self.sampler.config.constraint.consume(committed)
        return committed

    def _lookup_chain(self, max_depth: int, pick) -> DraftTree | None:
        """The prompt-lookup chain below the root (settings.lookup tokens at most), or None when
        lookup is off or the sequence's end occurred nowhere before."""
        if self.lookup is None or max_depth < 1:
            return None
        self.lookup.sequence = self.drafter.sequence  # the same list: its copy grows with it
        n = self.settings.lookup
        chain = self.lookup.draft_tree(self._root, TreeSettings(tree_size=n, depth=n, topk=1), max_depth, pick)
        return chain if chain.size > 1 else None

    def _accept(self, tree: DeviceTree | DraftTree, logits: torch.Tensor) -> tuple[list[int], list[int], int]:
        """(accepted node indices from the root, their tokens, the bonus token)."""
        assert self.sampler is not None
        greedy = self.sampler.config.greedy
        if self.sampler.config.adjusts_logits:
            path_counts = None
            if self.sampler.config.penalised:
                # Row i continues the committed sequence with node i's path: its own history.
                rows = tree if isinstance(tree, DeviceTree) else DeviceTree.from_host(tree, logits.device)
                path_counts = path_token_counts(rows, logits.shape[-1])
            logits = self.sampler.adjust(logits, path_counts)
        if self.sampler.config.constraint is not None:
            assert isinstance(tree, DraftTree)  # step() drafts on the host for a grammar
            if not full_grammar_masks():
                path, bonus = accept_constrained(tree, logits, self.sampler)
                return path, [tree.tokens[i] for i in path], bonus
            logits = self.sampler.config.constraint.mask(logits, tree_paths_below_root(tree))
        if isinstance(tree, DeviceTree):  # one host read, for the accepted path
            if greedy:
                return accept_greedy_on_device(tree, logits)
            return accept_sampling_on_device(tree, self.sampler.probs(logits), self.sampler.generator, logits)
        if greedy:
            path, bonus = accept_greedy(tree, logits)
        else:
            checked_tokens(torch.empty(0, dtype=torch.int64, device=logits.device), logits)  # NaN: an error, not a token
            path, bonus = accept_sampling(tree, self.sampler.probs(logits), self.sampler.generator)
        return path, [tree.tokens[i] for i in path], bonus

    def stats(self) -> dict[str, Any]:
        """Speculation statistics merged into GenerationStats (and `--stats`' JSON line)."""
        steps = sum(self.accept_lengths.values())
        tokens = sum(k * v for k, v in self.accept_lengths.items())
        s = self.settings
        constraint = self.sampler.config.constraint if self.sampler is not None else None
        # A grammar's vocabulary-wide masks over the generation (GrammarState.full_masks).
        masks = {"grammar_masks": constraint.full_masks} if constraint is not None else {}
        return {
            "draft": self.drafter.name,
            "tree_size": s.tree_size, "depth": s.depth, "topk": s.topk,
            **({"lookup": s.lookup, "lookup_accepted_tokens": self.lookup_tokens} if s.lookup else {}),
            # Tokens committed per target forward (verification steps), the bonus token included.
            "mean_accepted_length": round(tokens / steps, 3) if steps else 0.0,
            "acceptance_histogram": {str(k): self.accept_lengths[k] for k in sorted(self.accept_lengths)},
            "mean_tree_size": round(sum(self.tree_sizes) / len(self.tree_sizes), 2) if self.tree_sizes else 0.0,
            **masks,
        }


def tree_paths_below_root(tree: DraftTree) -> list[list[int]]:
    """Each node's tokens from below the root (the last committed token) down to the node itself:
    what a row of the verification continues the committed text with (the root's is empty)."""
    paths: list[list[int]] = [[]]
    for i in range(1, tree.size):
        paths.append(paths[tree.parents[i]] + [tree.tokens[i]])  # parents come before their children
    return paths


def path_token_counts(tree: DeviceTree, vocab: int) -> torch.Tensor:
    """int32 [N, V]: how often each token occurs on node i's path below the root, i.e. what row i's
    history adds to the committed sequence (the root is the last committed token)."""
    below_root = tree.visible.clone()  # [N, N]: row i true at i and its ancestors
    below_root[:, 0] = False
    n = tree.size
    counts = torch.zeros(n, vocab, dtype=torch.int32, device=tree.tokens.device)
    return counts.scatter_add_(1, tree.tokens.unsqueeze(0).expand(n, n), below_root.to(torch.int32))


def speculative_factory(drafter: Drafter, settings: TreeSettings):
    """A strategy factory for LLM.set_strategy: (model, cache) -> SpeculativeDecoding."""
    settings.validate()
    # One for every strategy it makes (a chat's next turn extends its copy of the sequence).
    lookup = NgramDrafter(min_n=GRAFT_MIN_N) if settings.lookup else None

    def make(model: Decoder, cache: KVCache) -> SpeculativeDecoding:
        return SpeculativeDecoding(model, cache, drafter, settings, lookup=lookup)

    make.drafter = drafter      # type: ignore[attr-defined]  (introspection: which draft is installed)
    make.settings = settings    # type: ignore[attr-defined]
    return make
