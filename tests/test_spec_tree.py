"""Hand-built golden cases for draft trees (EAGLE-2 construction, positions, bit-packed masks) and
for acceptance (greedy longest path, lossless sampling), compared exactly."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from edgespec import ops
from edgespec.spec import DraftTree, ExpandBatch, TreeSettings, accept_greedy, accept_sampling, build_tree

# Draft distributions of a 6-token vocabulary: ROOT after the root, NEXT[t] after token t.
ROOT = [0.5, 0.3, 0.1, 0.05, 0.03, 0.02]
NEXT = {
    0: [0.08, 0.1, 0.62, 0.16, 0.02, 0.02],
    1: [0.02, 0.03, 0.15, 0.05, 0.7, 0.05],
    2: [0.4, 0.05, 0.05, 0.3, 0.1, 0.1],
    3: [0.1, 0.1, 0.1, 0.1, 0.3, 0.3 + 1e-3],
    4: [0.05, 0.6, 0.05, 0.1, 0.05, 0.15],
    5: [0.2, 0.2, 0.2, 0.2, 0.1, 0.1 + 1e-3],
}


class TableDraft:
    """A drafter whose next-token distribution depends only on the last token; records its batches."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset  # target id = draft id + offset (an FR-Spec-like token map)
        self.batches: list[ExpandBatch] = []

    def __call__(self, batch: ExpandBatch) -> tuple[torch.Tensor, None]:
        self.batches.append(batch)
        rows = [NEXT[int(t) - self.offset] for t in batch.tokens[-batch.new:]]
        return torch.tensor(rows).log(), None


def grow(tree_size: int, depth: int, topk: int, offset: int = 0, max_depth: int | None = None):
    draft = TableDraft(offset)
    token_map = None if offset == 0 else torch.arange(6) + offset
    tree = build_tree(99, torch.tensor(ROOT).log(), None, draft, TreeSettings(tree_size, depth, topk),
                      token_map=token_map, max_depth=max_depth)
    return tree, draft


def test_eagle2_tree_golden():
    # Candidates (cumulative draft prob): d1: 0 (.5), 1 (.3); d2 from the frontier {0, 1}:
    # 0->2 (.31), 0->3 (.08), 1->4 (.21), 1->2 (.045); d3 from the frontier {0->2, 1->4}:
    # 2->0 (.124), 2->3 (.093), 4->1 (.126), 4->5 (.0315). The best 5: .5, .31, .3, .21, .126.
    tree, draft = grow(tree_size=5, depth=3, topk=2)
    assert tree.tokens == [99, 0, 1, 2, 4, 1]
    assert tree.parents == [-1, 0, 0, 1, 2, 4]
    assert tree.depths == [0, 1, 1, 2, 2, 3]
    assert tree.children == [[1, 2], [3], [4], [], [5], []]
    assert [round(math.exp(s), 4) for s in tree.scores[1:]] == [0.5, 0.3, 0.31, 0.21, 0.126]
    # Two draft rounds; the second re-runs the depth-1 nodes under the mask of the expanded nodes.
    assert len(draft.batches) == 2
    b1, b2 = draft.batches
    assert b1.tokens.tolist() == [0, 1] and b1.depths.tolist() == [1, 1] and b1.new == 2 and b1.slot_offset == 0
    assert b1.tree_mask.tolist() == [[1], [2]]
    assert b2.tokens.tolist() == [0, 1, 2, 4] and b2.depths.tolist() == [1, 1, 2, 2] and b2.new == 2
    assert b2.tree_mask.tolist() == [[0b0001], [0b0010], [0b0101], [0b1010]]


def pick_where(allowed, forced=lambda path: None):
    """A PickFn from a predicate allowed(path, token) and forced(path) (the token forced after
    path, or None), recording the paths it was asked about."""
    asked = []

    def pick(path, drafts, count):
        asked.append(list(path))
        if forced(path) is not None:
            return [forced(path)], True
        return [t for t in drafts if allowed(path, t)][:count], False
    return pick, asked


def test_picked_drafts_take_the_places_of_refused_ones():
    # Token 1 refused everywhere. d1 (top 4 of ROOT: 0 1 2 3): 0 (.5), 2 (.1). d2 from {0, 2}:
    # 0->2 (.31), 0->3 (.08) (0->1 refused), 2->0 (.04), 2->3 (.03). d3 from {0->2, 0->3}:
    # 2->0 (.124), 2->3 (.093), 3->5 (.02408), 3->4 (.024). The best 5: .5 .31 .124 .1 .093.
    pick, asked = pick_where(lambda path, token: token != 1)
    tree = build_tree(99, torch.tensor(ROOT).log(), None, TableDraft(), TreeSettings(5, 3, 2), pick=pick)
    assert tree.tokens == [99, 0, 2, 2, 0, 3]
    assert tree.parents == [-1, 0, 0, 1, 3, 3]
    assert [round(math.exp(s), 4) for s in tree.scores[1:]] == [0.5, 0.1, 0.31, 0.124, 0.093]
    assert asked == [[], [0], [2], [0, 2], [0, 3]]          # the root, then each round's frontier


def test_refused_nodes_rank_last_and_are_left_out_on_the_cpu():
    # Nothing may follow 0: its two places hold 0->2 and 0->3 at -inf, which nobody expands. d2
    # from {0, 1}: 1->4 (.21), 1->2 (.045); d3 from {1->4, 1->2}: 4->1 (.126), 4->5 (.0315),
    # 2->0 (.018), 2->3 (.0135). The best 5: .5 .3 .21 .126 .045 (unpicked, 0->2 .31 would be in).
    pick, asked = pick_where(lambda path, token: path != [0])
    tree = build_tree(99, torch.tensor(ROOT).log(), None, TableDraft(), TreeSettings(5, 3, 2), pick=pick)
    assert tree.tokens == [99, 0, 1, 4, 2, 1] and tree.parents == [-1, 0, 0, 2, 2, 3]
    assert asked == [[], [0], [1], [1, 4], [1, 2]]
    # A tree of up to 20 nodes: only the 8 allowed ones (2 + 2 + 4) are verified.
    tree = build_tree(99, torch.tensor(ROOT).log(), None, TableDraft(), TreeSettings(20, 3, 2), pick=pick)
    assert tree.size == 9 and 0 not in [tree.tokens[p] for p in tree.parents[1:] if p > 0]
    assert all(math.isfinite(s) for s in tree.scores)
    # Without the drop (a GPU keeps its graph's shape) the refused ones fill the places left.
    from edgespec.spec.tree import grow_candidates, select_tree
    cands = grow_candidates(torch.tensor(ROOT).log(), None, TableDraft(), TreeSettings(20, 3, 2), None, 3, pick=pick)
    full = select_tree(99, cands, 20)
    refused = [i for i, s in enumerate(full.scores) if s == -math.inf]
    assert full.size == 11 and full.children[1] == refused and [full.tokens[i] for i in refused] == [2, 3]
    assert select_tree(99, cands, 8).tokens == tree.tokens          # the 8 best are the allowed ones


def test_a_forced_token_is_a_sure_child():
    # After 1 only 3 may come (draft prob .05, outside 1's top 2): 1->3 scores 1's .3, and 1's
    # best draft, 4 (.21), fills its other place at -inf. d2 from {0, 1}: 0->2 (.31), 0->3 (.08),
    # 1->3 (.3), 1->4 (refused). d3 from {0->2, 1->3}: 2->0 (.124), 2->3 (.093), 3->5 (.0902),
    # 3->4 (.0899; NEXT[3] sums to 1.001). The best 7: .5 .31 .3 .3 .124 .093 .0902.
    pick, asked = pick_where(lambda path, token: True, lambda path: 3 if path == [1] else None)
    tree = build_tree(99, torch.tensor(ROOT).log(), None, TableDraft(), TreeSettings(7, 3, 2), pick=pick)
    assert asked == [[], [0], [1], [0, 2], [1, 3]]
    assert tree.tokens == [99, 0, 1, 2, 3, 0, 3, 5] and tree.parents == [-1, 0, 0, 1, 2, 3, 3, 4]
    assert [round(math.exp(s), 4) for s in tree.scores[1:]] == [0.5, 0.3, 0.31, 0.3, 0.124, 0.093, 0.0902]


def test_tree_size_six_adds_next_best():
    tree, _ = grow(tree_size=6, depth=3, topk=2)
    assert tree.tokens == [99, 0, 1, 2, 4, 0, 1]   # 2->0 (.124) joins, created before 4->1
    assert tree.parents == [-1, 0, 0, 1, 2, 3, 4]


def test_chain_runs_only_the_new_node_causally():
    tree, draft = grow(tree_size=8, depth=4, topk=1)
    assert tree.tokens == [99, 0, 2, 0, 2] and tree.parents == [-1, 0, 1, 2, 3]
    assert [(b.tokens.tolist(), b.slot_offset, b.tree_mask) for b in draft.batches] == [
        ([0], 0, None), ([2], 1, None), ([0], 2, None)]


def test_token_map_and_depth_cap():
    tree, _ = grow(tree_size=5, depth=3, topk=2, offset=10)
    assert tree.tokens == [99, 10, 11, 12, 14, 11]
    tree, draft = grow(tree_size=5, depth=3, topk=2, max_depth=1)
    assert tree.tokens == [99, 0, 1] and not draft.batches
    tree, _ = grow(tree_size=5, depth=3, topk=2, max_depth=0)
    assert tree.tokens == [99] and tree.packed_mask().tolist() == [[1]]


def test_expansion_stops_once_no_deeper_node_can_enter():
    # After round 1 the best two candidates are 0 (.5) and 0->2 (.31); the frontier's best is 0->2
    # itself, so its children (<= .31, created later) cannot displace either: no more rounds.
    tree, draft = grow(tree_size=2, depth=6, topk=2)
    assert tree.tokens == [99, 0, 2] and tree.parents == [-1, 0, 1]
    assert len(draft.batches) == 1


class RandomTableDraft:
    """A drafter with a fixed random next-token table over `vocab` tokens (peaked rows, some ties)."""

    def __init__(self, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = (torch.randn(vocab, vocab, generator=g) * 3).log_softmax(-1)
        self.table[0, :2] = math.log(0.25)  # an exact tie between two siblings
        self.rounds = 0

    def __call__(self, batch: ExpandBatch) -> tuple[torch.Tensor, None]:
        self.rounds += 1
        return self.table[batch.tokens[-batch.new:]], None


def random_settings_and_root(g: torch.Generator, vocab: int, max_size: int, max_depth: int):
    """Random tree settings (sizes below max_size, depths below max_depth, top-k 1..4) and root log-probs."""
    settings = TreeSettings(tree_size=int(torch.randint(1, max_size, (1,), generator=g)),
                            depth=int(torch.randint(2, max_depth, (1,), generator=g)),
                            topk=int(torch.randint(1, 5, (1,), generator=g)))
    return settings, (torch.randn(vocab, generator=g) * 3).log_softmax(-1)


@pytest.mark.parametrize("seed", range(40))
def test_early_stop_gives_the_tree_of_full_depth(seed, monkeypatch):
    import edgespec.spec.tree as tree_module
    g = torch.Generator().manual_seed(1000 + seed)
    vocab = 8
    settings, root = random_settings_and_root(g, vocab, max_size=40, max_depth=9)
    fast_draft = RandomTableDraft(vocab, seed)
    fast = build_tree(0, root, None, fast_draft, settings)
    monkeypatch.setattr(tree_module, "_deeper_nodes_cannot_enter", lambda *args: False)
    full_draft = RandomTableDraft(vocab, seed)
    full = build_tree(0, root, None, full_draft, settings)
    assert (fast.tokens, fast.parents, fast.scores) == (full.tokens, full.parents, full.scores)
    assert fast_draft.rounds <= full_draft.rounds == settings.depth - 1


@pytest.mark.parametrize("seed", range(30))
def test_device_selection_and_greedy_acceptance_equal_the_host_ones(seed):
    """select_tree_on_device and accept_greedy_on_device (what graphed speculation runs, with no
    host read until the accepted path) give select_tree's tree and accept_greedy's path and bonus,
    on random drafts and on targets that follow a random path of the tree deep."""
    from edgespec.spec.accept import accept_greedy_on_device, accept_sampling_on_device
    from edgespec.spec.tree import grow_candidates, select_tree, select_tree_on_device

    g = torch.Generator().manual_seed(2000 + seed)
    vocab = 10
    settings, root_logits = random_settings_and_root(g, vocab, max_size=30, max_depth=7)
    cands = grow_candidates(root_logits, None, RandomTableDraft(vocab, seed), settings, None, settings.depth)
    want = select_tree(7, cands, settings.tree_size)
    got = select_tree_on_device(torch.tensor([7]), cands, settings.tree_size, settings.depth, settings.topk)
    assert (got.tokens.tolist(), got.parents.tolist(), got.depths.tolist()) == (want.tokens, want.parents, want.depths)
    # Sampled acceptance draws the same random numbers on both (per sibling slot up to top-k).
    drafted = select_tree(7, cands, settings.tree_size, min(settings.topk, vocab))
    probs = torch.softmax(torch.randn(want.size, vocab, generator=g) * 2, dim=-1)
    sampled = accept_sampling_on_device(got, probs, torch.Generator().manual_seed(seed))
    path, bonus = accept_sampling(drafted, probs, torch.Generator().manual_seed(seed))
    assert sampled == (path, [want.tokens[i] for i in path], bonus)
    assert torch.equal(got.mask, want.packed_mask()) and torch.equal(got.positions(40), want.positions(40))
    # Targets: the argmax after each node is a random token, or (to accept deep paths) the token
    # of a random child.
    for trial in range(4):
        best = torch.randint(0, vocab, (want.size,), generator=g)
        for i, children in enumerate(want.children):
            if children and torch.rand((), generator=g) < 0.8:
                best[i] = want.tokens[children[int(torch.randint(len(children), (1,), generator=g))]]
        logits = onehot_logits(best.tolist(), vocab)
        path, bonus = accept_greedy(want, logits)
        assert accept_greedy_on_device(got, logits) == (path, [want.tokens[i] for i in path], bonus)
    with pytest.raises(Exception, match="non-finite logits"):
        accept_greedy_on_device(got, torch.full((want.size, vocab), float("nan")))


def test_children_table_lists_siblings_in_creation_order():
    from edgespec.spec.tree import DeviceTree

    tree = DraftTree.from_parents([0, 5, 7, 9, 5, 3, 8], [-1, 0, 1, 0, 1, 3, 0])  # siblings not adjacent
    table = DeviceTree.from_host(tree, "cpu").children_table().tolist()
    assert table == [c + [-1] * (3 - len(c)) for c in tree.children] == [[1, 3, 6], [2, 4, -1], [-1, -1, -1],
                                                                          [5, -1, -1], [-1] * 3, [-1] * 3, [-1] * 3]


def test_nan_draft_logits_give_a_valid_tree():
    # A draft that overflowed (fp16) returns NaN rows; NaN must rank last, not first, or a child
    # would be kept without its parent.
    def nan_after_token_1(batch: ExpandBatch) -> tuple[torch.Tensor, None]:
        rows = torch.tensor([NEXT[int(t)] for t in batch.tokens[-batch.new:]]).log()
        rows[batch.tokens[-batch.new:] == 1] = float("nan")
        return rows, None

    tree = build_tree(99, torch.tensor(ROOT).log(), None, nan_after_token_1, TreeSettings(20, 4, 3))
    assert all(p < i for i, p in enumerate(tree.parents) if i > 0)
    assert tree.depths == [0] + [tree.depths[p] + 1 for p in tree.parents[1:]]
    nan_children = [i for i, p in enumerate(tree.parents) if p > 0 and tree.tokens[p] == 1]
    assert all(tree.scores[i] == -math.inf for i in nan_children)
    assert all(math.isfinite(s) for i, s in enumerate(tree.scores) if i not in nan_children)


@pytest.mark.parametrize("topk", [6, 50])
def test_topk_larger_than_vocab_is_clamped(topk):
    tree, _ = grow(tree_size=100, depth=2, topk=topk)
    assert tree.size == 1 + 6 + 36
    assert sorted(tree.tokens[1:7]) == list(range(6))


def test_positions_and_packed_mask_of_a_small_tree():
    tree = DraftTree.from_parents([7, 1, 2, 3, 4], [-1, 0, 0, 1, 3])
    assert tree.positions(40).tolist() == [40, 41, 41, 42, 43]
    assert tree.packed_mask().tolist() == [[0b00001], [0b00011], [0b00101], [0b01011], [0b11011]]
    assert torch.equal(tree.visibility(), ops.unpack_tree_mask(tree.packed_mask(), 5))
    assert tree.path_to(4) == [0, 1, 3, 4]


def test_mask_words_beyond_64_tokens():
    # A 70-token chain: row i sees 0..i. Row 63 fills word 0 (all 64 bits: -1 as int64), row 64
    # spills one bit into word 1; a second branch hanging off the root at node 69 sees only 0 and 69.
    parents = list(range(-1, 68)) + [0]
    tree = DraftTree.from_parents(list(range(70)), parents)
    m = tree.packed_mask()
    assert m.shape == (70, 2) and m.dtype == torch.int64
    assert m[0].tolist() == [1, 0]
    assert m[62].tolist() == [(1 << 63) - 1, 0]
    assert m[63].tolist() == [-1, 0]
    assert m[64].tolist() == [-1, 1]
    assert m[68].tolist() == [-1, 0b11111]
    assert m[69].tolist() == [1, 1 << 5]
    dense = tree.visibility()
    assert dense[68, :69].all() and not dense[68, 69] and dense[69].nonzero().flatten().tolist() == [0, 69]


def test_bad_trees_and_settings_are_rejected():
    with pytest.raises(ValueError, match="parents must precede"):
        DraftTree([1, 2], [-1, 1], [0, 1], [0.0, 0.0])
    with pytest.raises(ValueError, match="root"):
        DraftTree([1], [0], [0], [0.0])
    for bad in (dict(tree_size=0, depth=3, topk=2), dict(tree_size=4, depth=-1, topk=2),
                dict(tree_size=4, depth=3, topk=1.5)):
        with pytest.raises(ValueError, match="positive integer"):
            TreeSettings(**bad).validate()


# ----------------------------------------------------------------------------------------------
# Acceptance

# Root 0 with children 1 (token 5) and 2 (token 7); node 1 -> 3 (token 9), 4 (token 5);
# node 2 -> 5 (token 3); node 5 -> 6 (token 8).
ACCEPT_TREE = DraftTree.from_parents([0, 5, 7, 9, 5, 3, 8], [-1, 0, 0, 1, 1, 2, 5])


def onehot_logits(argmax: list[int], vocab: int = 12) -> torch.Tensor:
    logits = torch.randn(len(argmax), vocab, generator=torch.Generator().manual_seed(0))
    for i, a in enumerate(argmax):
        logits[i, a] = 20.0
    return logits


@pytest.mark.parametrize("argmax, path, bonus", [
    ([7, 0, 3, 0, 0, 8, 4], [0, 2, 5, 6], 4),   # the whole second branch, then the bonus after token 8
    ([7, 0, 3, 0, 0, 1, 0], [0, 2, 5], 1),      # stops when 3's successor is not drafted
    ([5, 5, 0, 0, 0, 0, 0], [0, 1, 4], 0),      # the second child of node 1 matches
    ([11, 0, 0, 0, 0, 0, 0], [0], 11),          # nothing accepted: the bonus is the target's own token
])
def test_greedy_acceptance_golden(argmax, path, bonus):
    assert accept_greedy(ACCEPT_TREE, onehot_logits(argmax)) == (path, bonus)


@pytest.mark.parametrize("argmax, path, bonus", [
    ([7, 0, 3, 0, 0, 8, 4], [0, 2, 5, 6], 4),
    ([5, 5, 0, 0, 0, 0, 0], [0, 1, 4], 0),
    ([11, 0, 0, 0, 0, 0, 0], [0], 11),
])
def test_sampling_with_one_hot_targets_is_exact(argmax, path, bonus):
    probs = torch.zeros(7, 12)
    probs[torch.arange(7), torch.tensor(argmax)] = 1.0
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        assert accept_sampling(ACCEPT_TREE, probs, g) == (path, bonus)


def first_token_counts(tree: DraftTree, probs: torch.Tensor, seed: int, n: int) -> torch.Tensor:
    """How often each token is the first committed one (an accepted child or the bonus) in n draws."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(probs.shape[1])
    for _ in range(n):
        path, bonus = accept_sampling(tree, probs, g)
        counts[tree.tokens[path[1]] if len(path) > 1 else bonus] += 1
    return counts


def test_sampling_first_token_matches_the_target_distribution():
    """Chi-square goodness of fit of the first committed token (children 5 and 7 tried first, then
    the residual) against p itself; 40,000 draws, p-value threshold 1e-3. A test of the test: the
    same statistic rejects a biased scheme that accepts the first child whenever p(x) >= 0.2."""
    p = torch.tensor([0.05, 0.1, 0.02, 0.08, 0.0, 0.25, 0.05, 0.3, 0.05, 0.05, 0.03, 0.02])
    probs = p.expand(3, 12).clone()
    tree = DraftTree.from_parents([0, 5, 7], [-1, 0, 0])
    n = 40_000
    counts = first_token_counts(tree, probs, 123, n)
    keep = p > 0
    assert counts[~keep].sum() == 0  # a zero-probability token is never produced
    pvalue = stats.chisquare(counts[keep].numpy(), (p[keep] * n).numpy()).pvalue
    assert pvalue > 1e-3, f"speculative sampling differs from p (chi-square p-value {pvalue:.2e})"
    biased = counts.clone()
    moved = 0.5 * counts[7]           # a scheme that over-accepts token 7 by half of its mass
    biased[7] += moved
    biased[[0, 1, 3]] -= moved / 3
    assert stats.chisquare(biased[keep].numpy(), (p[keep] * n).numpy()).pvalue < 1e-3


def test_sampling_residual_when_children_hold_all_mass():
    # All mass on the two children: one of them is always accepted, never a residual draw.
    p = torch.zeros(12)
    p[5], p[7] = 0.4, 0.6
    probs = p.expand(3, 12).clone()
    tree = DraftTree.from_parents([0, 5, 7], [-1, 0, 0])
    g = torch.Generator().manual_seed(5)
    seen = set()
    for _ in range(300):
        path, _ = accept_sampling(tree, probs, g)
        assert len(path) == 2
        seen.add(path[1])
    assert seen == {1, 2}


def test_sampling_residual_keeps_tokens_only_padding_points_at():
    """Node 1 has one child (token 9) in a table two wide: its padding slot reads the root's token 3,
    which the bonus residual must keep (only rejected children leave it)."""
    tree = DraftTree.from_parents([3, 5, 7, 9], [-1, 0, 0, 1])
    probs = torch.zeros(4, 12)
    probs[0, 5] = 1.0                      # node 1 is always accepted
    probs[1, 3] = probs[1, 9] = 0.5        # then token 9 half the time, else the bonus, which can only be 3
    probs[2:, 0] = 1.0
    g = torch.Generator().manual_seed(2)
    seen = set()
    for _ in range(200):
        path, bonus = accept_sampling(tree, probs, g)
        seen.add((tuple(path), bonus))
    assert {path for path, _ in seen} == {(0, 1), (0, 1, 3)}
    assert {bonus for path, bonus in seen if path == (0, 1)} == {3}


def test_sampling_with_a_repeated_sibling_token_matches_the_target():
    """A tree whose root has token 7 twice (no drafter makes one, but nothing forbids it): the repeat
    must see its token already removed, so the first committed token still follows p."""
    p = torch.tensor([0.1, 0.0, 0.2, 0.0, 0.0, 0.3, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0])
    tree = DraftTree.from_parents([0, 7, 7, 5], [-1, 0, 0, 0])
    probs = p.expand(4, 12).clone()
    n = 4000
    counts = first_token_counts(tree, probs, 9, n)
    keep = p > 0
    assert counts[~keep].sum() == 0
    assert stats.chisquare(counts[keep].numpy(), (p[keep] * n).numpy()).pvalue > 1e-3


def test_kv_cache_compact_moves_the_path_and_skips_a_path_in_place() -> None:
    """compact moves the accepted path's K/V (list or tensor slots, overlapping ranges included)
    and leaves the cache untouched, without a device read, when a list path is already in place."""
    from edgespec.kv_cache import KVCache

    cache = KVCache(2, 16, 1, 4, torch.float32, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape))
    cache.v.copy_(torch.randn(cache.v.shape))
    k0, v0 = cache.k.clone(), cache.v.clone()
    cache.compact([5, 6, 7], 5)
    assert torch.equal(cache.k, k0) and torch.equal(cache.v, v0)
    cache.compact([5, 7, 9], 5)
    assert torch.equal(cache.k[:, 5:8], k0[:, [5, 7, 9]]) and torch.equal(cache.v[:, 5:8], v0[:, [5, 7, 9]])
    assert torch.equal(cache.k[:, :5], k0[:, :5]) and torch.equal(cache.k[:, 8:], k0[:, 8:])
    cache.compact(torch.tensor([6, 8]), 4)
    assert torch.equal(cache.k[:, 4:6], torch.stack([k0[:, 7], k0[:, 8]], dim=1))  # slots 6, 8 after the move
