"""Draft trees: EAGLE-2 dynamic construction, RoPE positions, parent arrays and bit-packed masks.

A tree's node 0 is the *root*: the last committed token, which the target has not processed yet.
Every other node is a draft token; its parent is the token before it. Nodes are stored in
creation order, so a parent always precedes its children (`parents[i] < i`) and siblings appear
in decreasing draft score. The target verifies the whole tree in one forward pass: node i sits at
RoPE position `prefix + depth[i]` and attends to the committed prefix plus its own ancestors.

EAGLE-2 construction (Li et al., 2024): depth 1 holds the top-k tokens of the draft's distribution
after the root; at each further depth the k nodes with the highest *cumulative* draft log-prob
are expanded (each proposes its top-k tokens), and at the end all candidates are reranked
globally and the best `tree_size` are kept. Because a child's cumulative log-prob never exceeds
its parent's and parents are created first, a stable descending sort keeps every selected node's
ancestors selected too, so the kept set is always a tree.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops


_WORD = (1 << 64) - 1


def _signed64(word: int) -> int:
    """An unsigned 64-bit pattern as the int64 with the same bits (bit 63 is the sign bit)."""
    return word - (1 << 64) if word >> 63 else word


@dataclass(frozen=True)
class TreeSettings:
    """Shape of the draft tree grown at every step.

    tree_size: draft tokens verified per step (the root is extra: the target processes
               tree_size + 1 tokens). Values above 64 need more than one mask word per row.
    depth:     deepest draft token allowed (at most depth - 1 draft rounds per step after the
               catch-up pass; fewer when no deeper node could enter the tree, see build_tree).
    topk:      tokens proposed per expanded node and nodes expanded per depth (1 = a chain).
    lookup:    draft tokens a prompt-lookup chain (spec.ngram) may add to a draft model's tree at
               each step, grafted below the root where the sequence repeats (0: none). The target
               then verifies up to tree_size + lookup + 1 tokens.
    """

    tree_size: int
    depth: int
    topk: int
    lookup: int = 0

    def validate(self) -> "TreeSettings":
        for name in ("tree_size", "depth", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculation setting {name} must be a positive integer, got {value!r}")
        if not isinstance(self.lookup, int) or isinstance(self.lookup, bool) or self.lookup < 0:
            raise ValueError(f"speculation setting lookup must be a non-negative integer, got {self.lookup!r}")
        return self

    @property
    def verified(self) -> int:
        """The most tokens one verification runs through the target (the root included)."""
        return self.tree_size + self.lookup + 1


@dataclass
class DraftTree:
    """A verified-in-one-pass token tree (see the module docstring).

    tokens:  [N] target token ids, node 0 = root
    parents: [N] parent node of each node, -1 for the root, parents[i] < i
    depths:  [N] distance from the root (root 0)
    scores:  [N] cumulative draft log-probability (root 0.0); informative only
    children_bound: the most children a node may have (the drafting top-k), or 0: as many as the
             tree has. Sampled acceptance draws its random numbers per sibling slot up to it, so a
             drafted tree consumes the same ones here as its DeviceTree does (spec.accept).
    """

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    scores: list[float]
    children_bound: int = 0

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not n or len(self.parents) != n or len(self.depths) != n or len(self.scores) != n:
            raise ValueError(f"DraftTree: tokens, parents, depths and scores must have the same non-zero length, "
                             f"got {n}, {len(self.parents)}, {len(self.depths)}, {len(self.scores)}")
        if self.parents[0] != -1 or self.depths[0] != 0:
            raise ValueError("DraftTree: node 0 must be the root (parent -1, depth 0)")
        for i in range(1, n):
            p = self.parents[i]
            if not 0 <= p < i:
                raise ValueError(f"DraftTree: node {i} has parent {p}; parents must precede their children")
            if self.depths[i] != self.depths[p] + 1:
                raise ValueError(f"DraftTree: node {i} has depth {self.depths[i]} but its parent has {self.depths[p]}")
        self.children: list[list[int]] = [[] for _ in range(n)]
        for i in range(1, n):
            self.children[self.parents[i]].append(i)

    @classmethod
    def from_parents(cls, tokens: list[int], parents: list[int]) -> "DraftTree":
        """A tree from tokens and parents alone (depths derived, scores 0)."""
        depths: list[int] = []
        for i, p in enumerate(parents):
            depths.append(0 if p < 0 else depths[p] + 1 if p < i else -1)
        return cls(list(tokens), list(parents), depths, [0.0] * len(tokens))

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def ancestor_bits(self) -> list[int]:
        """Row i of the visibility matrix as a Python int: bit j set iff node j is i or an ancestor of i."""
        bits: list[int] = []
        for i, p in enumerate(self.parents):
            bits.append((bits[p] if p >= 0 else 0) | (1 << i))
        return bits

    def packed_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tree mask as ops.attention takes it: int64 [N, ceil(N/64)], bit j % 64 of word j // 64
        of row i set iff node j is visible to node i (itself and its ancestors)."""
        words = ops.tree_mask_words(self.size)
        rows = [[_signed64((b >> (64 * w)) & _WORD) for w in range(words)] for b in self.ancestor_bits()]
        return torch.tensor(rows, dtype=torch.int64, device=device)

    def visibility(self) -> torch.Tensor:
        """bool [N, N]: row i is True at i and at every ancestor of i."""
        return ops.unpack_tree_mask(self.packed_mask(), self.size)

    def positions(self, start: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """RoPE positions int64 [N]: the root at `start`, a node at depth d at start + d."""
        return torch.tensor(self.depths, dtype=torch.int64, device=device) + start

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included."""
        path = [node]
        while self.parents[path[-1]] >= 0:
            path.append(self.parents[path[-1]])
        return path[::-1]

    def graft(self, other: "DraftTree") -> "DraftTree":
        """This tree with `other`'s nodes added below the same root: a node of `other` whose parent
        already has a child with its token merges into that child, every other one is appended (so
        parents still precede their children, siblings still hold distinct tokens, as the
        acceptance needs, and this tree's nodes keep their indices). Appended nodes score 0.0."""
        if other.tokens[0] != self.tokens[0]:
            raise ValueError(f"DraftTree.graft: the trees have different roots ({self.tokens[0]} and {other.tokens[0]})")
        tokens, parents = list(self.tokens), list(self.parents)
        depths, scores = list(self.depths), list(self.scores)
        child = {(parents[i], tokens[i]): i for i in range(1, len(tokens))}
        where = [0]  # other's node -> node of the result
        for i in range(1, other.size):
            parent, token = where[other.parents[i]], other.tokens[i]
            node = child.get((parent, token))
            if node is None:
                node = len(tokens)
                tokens.append(token)
                parents.append(parent)
                depths.append(depths[parent] + 1)
                scores.append(0.0)
                child[(parent, token)] = node
            where.append(node)
        # A node may now have more children than the bound; DeviceTree.from_host counts them.
        return DraftTree(tokens, parents, depths, scores, self.children_bound)


@dataclass
class ExpandBatch:
    """One draft round over the expanded nodes of a growing tree.

    tokens:     [E] int64 target ids of the nodes run through the draft this round
    states:     [E, Hs] the draft state each node consumes (its parent's draft output), or None
                for drafters without one (a standalone model)
    depths:     [E] int64 tree depth of each node (>= 1)
    slot_offset: the rows are written at draft-cache slots [committed + slot_offset, ... + E)
    tree_mask:  packed int64 [E, ceil(E/64)] visibility among the E rows (they also see the whole
                committed prefix), or None when the rows form a chain (causal)
    new:        outputs are needed only for the last `new` rows (the frontier being expanded)
    committed:  None (the drafter's own host-side committed length), or an int64 [1] tensor on the
                device holding it, which a CUDA graph of the draft rounds reads at every replay
    cache_view: with `committed`: the draft-cache slots attention views (edgespec.cuda_graphs)
    """

    tokens: torch.Tensor
    states: torch.Tensor | None
    depths: torch.Tensor
    slot_offset: int
    tree_mask: torch.Tensor | None
    new: int
    committed: torch.Tensor | None = None
    cache_view: int | None = None


# (batch) -> (draft logits [new, Vd] float, draft states [new, Hs] or None)
ExpandFn = Callable[[ExpandBatch], tuple[torch.Tensor, torch.Tensor | None]]

# pick(path, drafts, count) -> (tokens, forced): which tokens may follow the root and then `path`
# (the tokens below the root), given the drafts there (target ids, best first): at most `count` of
# the drafts in their order, or, forced True, the one token that alone may follow, drafted or not.
# A grammar's (GrammarState.draft_choices): a draft the grammar forbids is never accepted, so its
# place goes to the next best draft that it allows, and a token it forces is a sure guess.
PickFn = Callable[[list[int], list[int], int], tuple[list[int], bool]]

# How many of a node's best drafts `pick` looks through, per child it gets (top-k children).
PICK_WIDTH = 2


def _stable_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties broken towards the lower index (deterministic,
    unlike torch.topk, and parent-before-child because parents have lower indices)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


@dataclass
class Candidates:
    """Every node a tree's draft rounds proposed, in creation order (parents first), on the device:
    tokens (target ids), cumulative draft log-prob scores, parents (index into these arrays, -1
    for a child of the root) and depths (1 for a child of the root), all [N]."""

    tokens: torch.Tensor
    scores: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor


@dataclass
class DeviceTree:
    """A draft tree that stays on the device (select_tree_on_device): what a verification and a
    greedy acceptance need, with no host copy. N = size nodes, node 0 the root, creation order.

    tokens, parents (root -1), depths: int64 [N]; visible: bool [N, N], row i true at i and its
    ancestors; mask: the same packed as ops.attention takes it; max_depth and max_children: host
    bounds on depths and on the children of a node.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    visible: torch.Tensor
    mask: torch.Tensor
    max_depth: int
    max_children: int

    @classmethod
    def from_host(cls, tree: DraftTree, device: torch.device | str) -> "DeviceTree":
        visible = tree.visibility().to(device)
        return cls(torch.tensor(tree.tokens, dtype=torch.int64, device=device),
                   torch.tensor(tree.parents, dtype=torch.int64, device=device),
                   torch.tensor(tree.depths, dtype=torch.int64, device=device), visible,
                   tree.packed_mask(device), tree.max_depth,
                   max(tree.children_bound, max(map(len, tree.children))))

    def children_table(self) -> torch.Tensor:
        """int64 [N, max_children]: the children of each node in creation order, -1 padded."""
        n, k = self.size, self.max_children
        idx = torch.arange(n, device=self.tokens.device)
        same_parent = self.parents.unsqueeze(1) == self.parents.unsqueeze(0)
        rank = (same_parent & (idx.unsqueeze(0) < idx.unsqueeze(1))).sum(dim=1)  # earlier siblings
        # Column k of a scratch row collects the root (no parent) and anything past max_children.
        table = torch.full((n * (k + 1),), -1, dtype=torch.int64, device=idx.device)
        slot = torch.where((self.parents >= 0) & (rank < k), self.parents.clamp(min=0) * (k + 1) + rank, k)
        table.scatter_(0, slot, torch.where(slot == k, -1, idx))
        return table.view(n, k + 1)[:, :k]

    @property
    def size(self) -> int:
        return self.tokens.numel()

    def positions(self, start: int) -> torch.Tensor:
        """RoPE positions int64 [N]: the root at `start`, a node at depth d at start + d."""
        return self.depths + start


def build_tree(root_token: int, root_logits: torch.Tensor, root_state: torch.Tensor | None,
               expand: ExpandFn, settings: TreeSettings, token_map: torch.Tensor | None = None,
               max_depth: int | None = None, pick: PickFn | None = None) -> DraftTree:
    """Grow an EAGLE-2 dynamic tree below `root_token` (grow_candidates, then select_tree).

    root_logits: [Vd] float draft logits for the token after the root (from the catch-up pass).
    root_state:  [1, Hs] the draft state the depth-1 nodes consume, or None.
    expand:      runs one draft round (ExpandBatch) and returns logits/states of its new rows.
    token_map:   [Vd] int64 target id of each draft-vocabulary column (FR-Spec, EAGLE-3 d2t), or
                 None when the draft vocabulary is the target's.
    max_depth:   caps settings.depth (the end of the context or of the token budget).
    pick:        which drafts may enter the tree (a grammar's; see PickFn), or None for all.
    Growth stops before settings.depth once no deeper node could enter the final top tree_size
    (on the CPU; the tree is the same, the draft rounds are fewer).
    Returns the tree with at most settings.tree_size draft nodes; 0 draft nodes when max_depth is 0.
    On the CPU, where the target's verification costs per row, nodes that `pick` turned down are
    left out when too few others fill the tree; a GPU keeps the tree's full size, the shape its
    CUDA graph was captured for.
    """
    settings.validate()
    depth_limit = settings.depth if max_depth is None else min(settings.depth, max_depth)
    if depth_limit <= 0:
        return DraftTree([root_token], [-1], [0], [0.0])
    on_cpu = root_logits.device.type == "cpu"
    # The early stop reads scores on the host: free on the CPU, a sync per round on a GPU, where
    # the default trees are wide enough that it would rarely fire (unmeasured there: CPU only).
    cands = grow_candidates(root_logits, root_state, expand, settings, token_map, depth_limit,
                            stop_early=on_cpu, pick=pick)
    return select_tree(root_token, cands, settings.tree_size, children_bound(settings, root_logits.shape[-1]),
                       drop_refused=pick is not None and on_cpu)


def grow_candidates(root_logits: torch.Tensor, root_state: torch.Tensor | None, expand: ExpandFn,
                    settings: TreeSettings, token_map: torch.Tensor | None, depth_limit: int,
                    stop_early: bool = False, committed: torch.Tensor | None = None,
                    cache_view: int | None = None, pick: PickFn | None = None) -> Candidates:
    """The draft rounds of build_tree (depth_limit >= 1): every candidate node with its score.

    Without stop_early and pick nothing here is read on the host and every shape follows from
    (settings, depth_limit, the vocabulary), so the rounds can be captured as one CUDA graph;
    committed and cache_view are then passed to every ExpandBatch (see there).

    With pick, a node's children are the first k drafts that pick allows among its best
    k * PICK_WIDTH, or the one token it forces, which scores its parent's score (log-prob 0: the
    target can choose nothing else there); places left over hold the best of the other drafts at
    score -inf, so they rank below every allowed node, and no allowed node descends from them.

    The expanded nodes of earlier rounds are run through the draft again each round (when topk > 1)
    because the attention op sees every earlier cache slot as prefix: recomputing them under one
    tree mask is how the draft's own attention excludes the other branches. For a chain
    (topk == 1) every earlier node is an ancestor, so only the new node runs, causally.
    """
    device = root_logits.device
    vocab = root_logits.shape[-1]
    k = children_bound(settings, vocab)

    def to_target(ids: torch.Tensor) -> torch.Tensor:
        return ids if token_map is None else token_map[ids]

    # For pick, on the host: every candidate's target id, parent and whether pick allowed it.
    picked_tokens: list[int] = []
    picked_parents: list[int] = []
    picked_ok: list[bool] = []

    def path_to(node: int) -> list[int] | None:
        """The tokens below the root down to candidate `node` (-1: the root), None when pick
        refused one of them."""
        path = []
        while node >= 0:
            if not picked_ok[node]:
                return None
            path.append(picked_tokens[node])
            node = picked_parents[node]
        return path[::-1]

    def top_children(logits: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[rows, Vd] draft logits of the nodes `parents` -> the log-probs [rows, k] and target
        ids [rows, k] of their children, best first."""
        # Log-probs are clamped to <= 0 so a child's cumulative score never exceeds its parent's.
        # NaN (a draft that overflowed, e.g. in fp16) becomes -inf: a NaN sorts above every score,
        # which would keep a child whose parent was cut and break the tree.
        lp = torch.log_softmax(logits.float(), dim=-1).nan_to_num(nan=-math.inf).clamp(max=0.0)
        if pick is None:
            top = torch.topk(lp, k, dim=-1)  # sorted: siblings are created in score order
            return top.values, to_target(top.indices)
        wide = torch.topk(lp, min(vocab, k * PICK_WIDTH), dim=-1)
        drafts, draft_lp = to_target(wide.indices).tolist(), wide.values.tolist()
        tokens, values = [], []
        for row, parent in enumerate(parents.tolist()):
            path = path_to(parent)
            chosen, forced = pick(path, drafts[row], k) if path is not None else ([], False)
            lps = [0.0] if forced else [draft_lp[row][drafts[row].index(t)] for t in chosen]
            refused = [t for t in drafts[row] if t not in chosen][:k - len(chosen)]
            tokens.append(chosen + refused)
            values.append(lps + [-math.inf] * len(refused))
            picked_tokens.extend(tokens[-1])
            picked_parents.extend([parent] * k)
            picked_ok.extend([True] * len(chosen) + [False] * len(refused))
        return (torch.tensor(values, dtype=torch.float32, device=device),
                torch.tensor(tokens, dtype=torch.int64, device=device))

    values, ids = top_children(root_logits.reshape(1, vocab), torch.full((1,), -1, device=device))
    cand_tokens = [ids[0]]                                             # per depth: [n_d]
    cand_scores = [values[0]]                                          # per depth: [n_d]
    cand_parents = [torch.full((k,), -1, dtype=torch.int64, device=device)]  # global candidate index
    total = k
    frontier = torch.arange(k, device=device)                         # global indices of nodes to expand
    frontier_local = torch.arange(k, device=device)                   # their index within their depth
    frontier_states = None if root_state is None else root_state.expand(k, -1)
    # The expanded nodes, in draft-cache order (for the recompute scheme).
    exp_tokens: list[torch.Tensor] = []
    exp_states: list[torch.Tensor] = []
    exp_depths: list[torch.Tensor] = []
    exp_vis: torch.Tensor | None = None        # bool [E, E] visibility among expanded nodes
    exp_index_of_cand: dict[int, torch.Tensor] = {}  # depth -> [n_d] expanded index of candidates (-1: not expanded)
    for depth in range(1, depth_limit):
        if (stop_early and total >= settings.tree_size
                and _deeper_nodes_cannot_enter(cand_scores, cand_scores[depth - 1][frontier_local], settings.tree_size)):
            break
        kf = frontier.numel()
        base = sum(t.numel() for t in exp_tokens)  # rows already expanded
        tokens_d = cand_tokens[depth - 1][frontier_local]
        exp_tokens.append(tokens_d)
        if frontier_states is not None:
            exp_states.append(frontier_states)
        exp_depths.append(torch.full((kf,), depth, dtype=torch.int64, device=device))
        # Visibility of the new rows: their parent's row (an expanded node one depth up) plus themselves.
        new_vis = torch.zeros(kf, base + kf, dtype=torch.bool, device=device)
        if depth > 1:
            parent_local = cand_parents[depth - 1][frontier_local] - _depth_base(cand_tokens, depth - 1)
            parent_rows = exp_index_of_cand[depth - 1][parent_local]
            new_vis[:, :base] = exp_vis[parent_rows]
        new_vis[:, base:] = torch.eye(kf, dtype=torch.bool, device=device)
        if exp_vis is None:
            exp_vis = new_vis
        else:
            exp_vis = torch.cat([torch.nn.functional.pad(exp_vis, (0, kf)), new_vis], dim=0)
        index = torch.full((cand_tokens[depth - 1].numel(),), -1, dtype=torch.int64, device=device)
        index[frontier_local] = torch.arange(base, base + kf, device=device)
        exp_index_of_cand[depth] = index
        if k == 1:
            batch = ExpandBatch(tokens_d, frontier_states, exp_depths[-1], base, None, kf, committed, cache_view)
        else:
            batch = ExpandBatch(torch.cat(exp_tokens), torch.cat(exp_states) if exp_states else None,
                                torch.cat(exp_depths), 0, ops.pack_tree_mask(exp_vis), kf, committed, cache_view)
        logits, states = expand(batch)                                  # [kf, Vd], [kf, Hs]
        values, ids = top_children(logits, frontier)                    # [kf, k]
        scores = cand_scores[depth - 1][frontier_local].unsqueeze(1) + values   # [kf, k]
        cand_tokens.append(ids.reshape(-1))
        cand_scores.append(scores.reshape(-1))
        cand_parents.append(frontier.repeat_interleave(k))
        chosen = _stable_top(scores.reshape(-1), k)                      # local indices at depth + 1
        frontier_local = chosen
        frontier = chosen + total
        total += kf * k
        frontier_states = None if states is None else states[chosen // k]
    depths = torch.cat([torch.full((t.numel(),), d + 1, dtype=torch.int64, device=device)
                        for d, t in enumerate(cand_tokens)])
    return Candidates(torch.cat(cand_tokens), torch.cat(cand_scores), torch.cat(cand_parents), depths)


def children_bound(settings: TreeSettings, vocab: int) -> int:
    """The most children a drafted node gets: top-k of a vocabulary of `vocab` draft tokens."""
    return min(settings.topk, vocab)


def select_tree(root_token: int, cands: Candidates, tree_size: int, max_children: int = 0,
                drop_refused: bool = False) -> DraftTree:
    """The tree of the best `tree_size` candidates (one host read). A child scores at most its
    parent and comes after it, so a stable descending sort keeps every kept node's ancestors.
    drop_refused: leave out candidates scored -inf (those grow_candidates' pick refused), which
    keeps the rest a tree: every descendant of such a node scores -inf too."""
    keep = _stable_top(cands.scores, tree_size)
    if drop_refused:
        keep = keep[cands.scores[keep] > -math.inf]
    keep = torch.sort(keep).values  # creation order = topological
    tokens = cands.tokens[keep].tolist()
    parents_global = cands.parents[keep].tolist()
    scores_kept = cands.scores[keep].tolist()
    node_of = {g: i + 1 for i, g in enumerate(keep.tolist())}
    parents = [-1] + [0 if p < 0 else node_of[p] for p in parents_global]
    depths = [0]
    for p in parents[1:]:
        depths.append(depths[p] + 1)
    return DraftTree([root_token] + tokens, parents, depths, [0.0] + scores_kept, max_children)


def select_tree_on_device(root_token: torch.Tensor, cands: Candidates, tree_size: int, max_depth: int,
                          max_children: int) -> DeviceTree:
    """select_tree without the host: the same nodes in the same order, as a DeviceTree.

    root_token: int64 [1] on the candidates' device; max_depth: the rounds' depth limit (the
    ancestor walk runs that many steps, so nothing here is read on the host); max_children: their
    top-k.
    """
    keep = torch.sort(_stable_top(cands.scores, tree_size)).values    # creation order = topological
    n = keep.numel() + 1
    device = keep.device
    node_of = torch.zeros(cands.tokens.numel(), dtype=torch.int64, device=device)
    node_of[keep] = torch.arange(1, n, device=device)
    kept_parents = cands.parents[keep]
    parents = torch.cat([torch.full((1,), -1, dtype=torch.int64, device=device),
                         torch.where(kept_parents < 0, 0, node_of[kept_parents.clamp(min=0)])])
    tokens = torch.cat([root_token.reshape(1).to(torch.int64), cands.tokens[keep]])
    depths = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), cands.depths[keep]])
    # Row i: i and its ancestors, by following parent pointers max_depth times (the root is its
    # own parent here, so finished walks stay put).
    step = parents.clamp(min=0)
    visible = torch.eye(n, dtype=torch.bool, device=device)
    rows = torch.arange(n, device=device)
    up = step
    for _ in range(max_depth):
        visible[rows, up] = True
        up = step[up]
    return DeviceTree(tokens, parents, depths, visible, ops.pack_tree_mask(visible), max_depth, max_children)


def _deeper_nodes_cannot_enter(cand_scores: list[torch.Tensor], frontier_scores: torch.Tensor, tree_size: int) -> bool:
    """True when no node grown below the frontier could make the final rerank's top `tree_size`.

    A child scores at most its parent (log-probs are clamped to <= 0) and is created after every
    current candidate, so the stable rerank puts it behind any current candidate with an equal or
    higher score. Once the frontier's best score is at or below the current tree_size-th best,
    further rounds cannot change the tree: stopping there gives the same tree for less drafting,
    which makes a deep depth limit cheap at the steps where the draft is unsure.
    """
    nth_best = torch.topk(torch.cat(cand_scores), tree_size).values[-1]
    return bool(frontier_scores.max() <= nth_best)


def _depth_base(cand_tokens: list[torch.Tensor], depth: int) -> int:
    """Global candidate index of the first candidate at `depth` (1-based)."""
    return sum(t.numel() for t in cand_tokens[:depth - 1])
