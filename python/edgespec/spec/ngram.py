"""Prompt lookup (n-gram) drafting: speculation without any draft model.

The draft is what followed earlier occurrences of the sequence's last n tokens (the longest n from
max_n down to min_n that occurs before), read from the prompt and the text generated so far. Text
that quotes, edits or restates its prompt (extraction, summaries with quotes, code edits, repeated
structure such as JSON records) repeats long runs, which the target then accepts several tokens at a
time; where nothing matches, the tree is the root alone and a step costs what a plain decoding step
does. Every model can use it: it needs no weights, no training and no cache of its own.

Several occurrences with different continuations make a tree: a trie of up to `topk`
continuations, most recent occurrence first, within the tree's size and depth. Siblings hold
distinct tokens, as the acceptance needs, and a drafted token is a guess the target verifies like
any other: greedy output is plain decoding's, sampling keeps the target's distribution (the
acceptance treats every draft as proposed with certainty).

The drafter follows `sequence` (the prompt and every committed token, kept by SpeculativeDecoding)
with an index from each n-gram to the positions after its occurrences, extended as tokens are
committed, kept for a new sequence that continues the last (a chat's next turn) and rebuilt for
any other.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .drafter import TargetStates
from .tree import DraftTree, PickFn, TreeSettings

MIN_N, MAX_N = 1, 4
# The shortest match that drafts a chain grafted onto a draft model's tree (TreeSettings.lookup):
# the model already guesses what one repeated token predicts, so a unigram chain mostly adds rows to
# verify. Demo + head, 4-bit, tree 3,3,2 with lookup 6 (bench_spec.py --sweep, 1 thread), speedup
# over plain decoding on prompts-tuning-grounded.jsonl / prompts-tuning.jsonl (5 chat + 5
# continuations): min_n 1 1.29x / 1.32x; 2 1.35x / 1.42x; 3 1.30x / 1.46x; no lookup 1.08x / 1.37x
# (run-to-run noise about 5%).
GRAFT_MIN_N = 2


class NgramDrafter:
    """Drafts from the sequence itself; SpeculativeDecoding asks it for whole trees (draft_tree)."""

    capture: tuple[int, ...] = ()  # it reads no target states
    graphable = False

    def __init__(self, min_n: int = MIN_N, max_n: int = MAX_N) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram drafting needs 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.name = f"ngram:{min_n}-{max_n}"
        self.sequence: list[int] = []
        self._indexed: list[int] | None = None  # the sequence object the index describes
        self._length = 0                         # how much of it is indexed
        # n -> n-gram -> the positions just after its occurrences, in order.
        self._after: dict[int, dict[tuple[int, ...], list[int]]] = {}

    @property
    def committed(self) -> int:
        return len(self.sequence)

    def reset(self, max_len: int) -> None:
        pass

    def reusable(self, prompt: Sequence[int]) -> int:
        return len(prompt)  # no cache: nothing to recompute

    def prefill(self, prompt: torch.Tensor, first_token: int, target: TargetStates,
                start: int = 0) -> tuple[None, None]:
        return None, None

    def advance(self, tokens: torch.Tensor, target: TargetStates) -> tuple[None, None]:
        return None, None

    def draft_tree(self, root: int, settings: TreeSettings, max_depth: int, pick: PickFn | None = None) -> DraftTree:
        """The tree below `root` (the last token of `sequence`): continuations of the longest
        n-gram that ends the sequence and occurred before, at most settings.topk of them, at most
        min(settings.depth, max_depth) deep and settings.tree_size tokens in all. pick (a grammar's,
        spec.tree.PickFn) drops the tokens the grammar refuses, and what would follow them."""
        seq = self._index()
        if seq and seq[-1] != root:
            raise ValueError(f"n-gram drafter: the sequence ends with {seq[-1]}, not the root {root}")
        depth = min(settings.depth, max_depth)
        tokens, parents = [root], [-1]
        if depth < 1:
            return DraftTree.from_parents(tokens, parents)
        child: dict[tuple[int, int], int] = {}   # (node, token) -> node
        paths: list[list[int]] = [[]]            # tokens below the root, per node (for pick)
        for n in range(min(self.max_n, len(seq)), self.min_n - 1, -1):
            ends = self._after[n].get(tuple(seq[len(seq) - n:]), ())
            found = 0
            for end in reversed(ends):
                if end >= len(seq):  # the occurrence that ends the sequence itself
                    continue
                node = 0
                for token in seq[end:end + depth]:
                    nxt = child.get((node, token))
                    if nxt is None:
                        if len(tokens) > settings.tree_size or (
                                pick is not None and token not in pick(paths[node], [token], 1)[0]):
                            break
                        nxt = len(tokens)
                        tokens.append(token)
                        parents.append(node)
                        paths.append(paths[node] + [token])
                        child[(node, token)] = nxt
                    node = nxt
                found += 1
                if found == settings.topk or len(tokens) > settings.tree_size:
                    break
            if found:  # the longest n that occurred decides; shorter ones match more and predict less
                break
        return DraftTree.from_parents(tokens, parents)

    def _index(self) -> list[int]:
        """The sequence, its n-grams indexed: extended as it grows, kept for a new sequence that
        starts with the indexed one (the next turn of a chat), rebuilt for any other."""
        seq = self.sequence
        if seq is not self._indexed:
            old, kept = self._indexed, self._length
            if old is None or len(seq) < kept or seq[:kept] != old[:kept]:
                kept = 0
                self._after = {n: {} for n in range(self.min_n, self.max_n + 1)}
            self._indexed, self._length = seq, kept
        for end in range(self._length + 1, len(seq) + 1):  # ends 1.._length are indexed
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._after[n].setdefault(tuple(seq[end - n:end]), []).append(end)
        self._length = len(seq)
        return seq
