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
in a numpy copy, extended as tokens are committed, kept for a new sequence that continues the last
(a chat's next turn) and copied anew for any other. Occurrences are found by a vectorised scan at
each step (the positions holding the last token, narrowed to those the n - 1 tokens before it also
match), not by an index: an index of a 32K-token prompt took 0.2 s of Python to build, more than a
GPU's prefill of a small model, where the scan costs tens of microseconds a step.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
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
        self._copied: list[int] | None = None   # the sequence object _tokens holds
        self._length = 0                         # how much of it _tokens holds
        self._tokens = np.zeros(0, dtype=np.int64)  # its tokens in [: _length], capacity beyond

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
        seq = self._array()
        if len(seq) and seq[-1] != root:
            raise ValueError(f"n-gram drafter: the sequence ends with {seq[-1]}, not the root {root}")
        depth = min(settings.depth, max_depth)
        tokens, parents = [root], [-1]
        if depth < 1:
            return DraftTree.from_parents(tokens, parents)
        child: dict[tuple[int, int], int] = {}   # (node, token) -> node
        paths: list[list[int]] = [[]]            # tokens below the root, per node (for pick)
        # The longest n that occurred decides; shorter ones match more and predict less.
        for found, end in enumerate(reversed(self._match_ends(seq).tolist())):  # most recent first
            if found == settings.topk or len(tokens) > settings.tree_size:
                break
            node = 0
            for token in seq[end:end + depth].tolist():
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
        return DraftTree.from_parents(tokens, parents)

    def _match_ends(self, seq: np.ndarray) -> np.ndarray:
        """The positions just after the earlier occurrences (ascending) of the longest n-gram, n in
        [min_n, max_n], that ends `seq`; empty when none occurred. Each n's occurrences are among
        the shorter one's (the positions whose last n - 1 tokens match), so one scan for the last
        token and a filter per n find them all."""
        last = len(seq) - 1
        if last < 1:
            return np.zeros(0, dtype=np.int64)
        ends = np.flatnonzero(seq[:last] == seq[last])  # where an earlier copy of the last token sits
        best = ends if self.min_n <= 1 else ends[:0]
        for n in range(2, min(self.max_n, last + 1) + 1):
            ends = ends[ends >= n - 1]
            ends = ends[seq[ends - (n - 1)] == seq[last - (n - 1)]]
            if not ends.size:
                break
            if n >= self.min_n:
                best = ends
        return best + 1

    def _array(self) -> np.ndarray:
        """`sequence` as a numpy view: extended as it grows, kept for a new sequence that starts with
        the one held (the next turn of a chat), copied anew for any other."""
        seq = self.sequence
        if seq is not self._copied:
            old, kept = self._copied, self._length
            if old is None or len(seq) < kept or seq[:kept] != old[:kept]:
                kept = 0
            self._copied, self._length = seq, kept
        if len(seq) > self._length:
            if len(seq) > len(self._tokens):  # grow by doubling: appends stay amortised O(1)
                grown = np.zeros(max(2 * len(self._tokens), len(seq), 64), dtype=np.int64)
                grown[:self._length] = self._tokens[:self._length]
                self._tokens = grown
            self._tokens[self._length:len(seq)] = seq[self._length:]
            self._length = len(seq)
        return self._tokens[:self._length]
