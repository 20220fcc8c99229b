"""Acceptance of a verified draft tree: greedy (longest matching path) and lossless sampling.

Both walk down from the root. At each node the target's distribution for the *next* token is
known (one verification forward computed all of them); the walk moves to a child when the
child's token is accepted and stops otherwise, and the token drawn at the stopping node is the
bonus token. So every step commits the accepted path plus one token from the target itself.

Lossless sampling: the tree is built deterministically (top-k children by draft score), so each
child is a draft from a point mass q = one-hot(x). Recursive rejection sampling over the
siblings in order then reads: accept x with probability min(1, p(x)/q(x)) = p(x); on rejection
p <- norm(max(p - q, 0)), i.e. x's mass is removed and the rest renormalised; if every child is
rejected, the token is drawn from that residual. The result is distributed exactly as p: it is
sampling from p while testing the children first. Keeping the tree deterministic means greedy and
sampled decoding share one tree (one shape to capture on GPU), and the acceptance probability at
a node, the p-mass of its children, is the most any scheme can get from a fixed set of candidates.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import ops
from ..generation import Sampler, checked_tokens
from .tree import DeviceTree, DraftTree


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Longest path whose every token is the target's argmax after its parent.

    logits: [N, V] float target logits, row i = distribution after node i.
    Returns (accepted node indices starting with the root, bonus token id).
    """
    best = checked_tokens(ops.argmax(logits), logits)  # one host sync for the whole tree
    return accept_walk(tree, lambda node, below: best[node])


def accept_walk(tree: DraftTree, pick: Callable[[int, list[int]], int]) -> tuple[list[int], int]:
    """Walk down from the root: at each node the target picks its next token, pick(node, the
    tokens of the node's path below the root), and the walk moves to the child holding it or stops
    with it as the bonus token.

    With pick = the row's argmax this is greedy acceptance. With pick = a draw y ~ p from the
    row's distribution it is lossless sampling with accept_sampling's law: for point-mass drafts
    on distinct tokens the sequential rejection accepts sibling s with probability
    (1 - p(x_1) - ... - p(x_s-1)) * p(x_s) / (1 - p(x_1) - ... - p(x_s-1)) = p(x_s), which is the
    chance that y = x_s, and its bonus is p without the children, renormalised, which is y given
    that it is none of them. The walk asks only for the rows it reaches, one per accepted token
    plus the stopping node: what lets a grammar's mask be computed for those rows alone
    (accept_constrained). Returns (accepted node indices starting with the root, bonus token id).
    """
    node, path, below = 0, [0], []
    while True:
        token = pick(node, below)
        nxt = next((c for c in tree.children[node] if tree.tokens[c] == token), None)
        if nxt is None:
            return path, token
        path.append(nxt)
        below.append(token)
        node = nxt


def accept_constrained(tree: DraftTree, logits: torch.Tensor, sampler: Sampler) -> tuple[list[int], int]:
    """Greedy or sampled acceptance under the grammar of sampler.config.constraint, which masks each
    row by the committed text plus the row's path, without that mask on every row.

    A vocabulary-wide mask costs more host time than a GPU's target forward over the tree (0.15 to
    0.3 ms a row for 49K tokens on a CPU thread, 60 rows in a GPU tree), yet acceptance reads only
    the rows its walk reaches (accept_walk), and at most of those the target's own choice is one
    the grammar allows, which llguidance tells in microseconds. So the walk takes the row's
    unconstrained choice (greedy: every row's argmax in one host read, as accept_greedy's;
    sampling: a draw from the row when reached) where the grammar allows it after the node's path,
    and elsewhere masks that row alone and chooses again (Sampler.constrained_token): the masked
    argmax exactly, a draw from the masked distribution exactly, never a draft the grammar forbids.

    logits: [N, V] target logits after the sampler's bias and penalties, row i = after node i.
    Returns (accepted node indices starting with the root, bonus token id).
    """
    best = sampler.unconstrained_choices(logits)  # greedy: N ints; sampling: None (drawn per row reached)
    return accept_walk(tree, lambda node, below: sampler.constrained_token(
        logits, node, below, None if best is None else best[node]))


def _accepted_path_end(tree: DeviceTree, accepted_child: torch.Tensor) -> torch.Tensor:
    """The deepest node of the accepted path, as a device scalar: a node is on it when it is its
    parent's accepted child and its parent is on it (the root always is)."""
    on_path = accepted_child[tree.parents.clamp(min=0)] == torch.arange(tree.size, device=tree.tokens.device)
    on_path[0] = True
    step = tree.parents.clamp(min=0)
    for _ in range(tree.max_depth):
        on_path = on_path & on_path[step]
    return torch.where(on_path, tree.depths, -1).argmax()


def _read_path(tree: DeviceTree, end: torch.Tensor, bonus: torch.Tensor,
               logits: torch.Tensor | None) -> tuple[list[int], list[int], int]:
    """(path node indices, their tokens, bonus) in one host read (with the logits' NaN check)."""
    n = tree.size
    # index_select, not [end]: indexing with a 0-dim tensor reads it on the host.
    on_path = tree.visible.index_select(0, end.reshape(1)).reshape(-1)
    packed = torch.cat([on_path.long(), tree.tokens, bonus.reshape(1).long()])
    values = checked_tokens(packed, logits) if logits is not None else packed.tolist()
    path = [i for i in range(n) if values[i]]
    return path, [values[n + i] for i in path], values[-1]


def accept_greedy_on_device(tree: DeviceTree, logits: torch.Tensor) -> tuple[list[int], list[int], int]:
    """accept_greedy on a DeviceTree with one host read (the path and the bonus token).

    A node's accepted child is the one whose token is the target's argmax after it; siblings hold
    distinct tokens (top-k of one distribution), so there is at most one, and the accepted nodes
    form one path from the root whose deepest node is where the walk stops.
    Returns (accepted node indices starting with the root, their tokens, bonus token id).
    """
    best = ops.argmax(logits)                                                  # [N]
    children = tree.children_table()                                           # [N, k]
    matches = (tree.tokens[children.clamp(min=0)] == best.unsqueeze(1)) & (children >= 0)
    accepted_child = torch.where(matches, children, -1).max(dim=1).values     # -1: none
    end = _accepted_path_end(tree, accepted_child)
    return _read_path(tree, end, best.index_select(0, end.reshape(1)), logits)


def accept_sampling(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """Lossless recursive rejection sampling over the tree (module docstring).

    probs: [N, V] fp32 target sampling distributions (ops.logits_to_probs of the verify logits).
    generator: the engine's seeded generator (same device as probs), so seeded runs reproduce.
    Returns (accepted node indices starting with the root, bonus token id).
    """
    path, _, bonus = accept_sampling_on_device(DeviceTree.from_host(tree, probs.device), probs, generator)
    return path, bonus


def accept_sampling_on_device(tree: DeviceTree, probs: torch.Tensor, generator: torch.Generator,
                              logits: torch.Tensor | None = None) -> tuple[list[int], list[int], int]:
    """accept_sampling on a DeviceTree with one host read (which also checks `logits`, the verify
    logits probs came from, for NaN/inf: NumericalError).

    Every node runs its siblings' rejection sequence at once (a node's decisions depend only on
    its own distribution and its own uniforms, so deciding at nodes the walk never reaches changes
    nothing about the nodes it does); then the walk follows the accepted children from the root,
    and the bonus token is drawn from the residual of the node where it stops.
    Returns (accepted node indices starting with the root, their tokens, bonus token id).
    """
    n = tree.size
    if probs.dim() != 2 or probs.shape[0] != n:
        raise ValueError(f"accept_sampling: probs must be [{n}, V], one row per tree node, got {tuple(probs.shape)}")
    # Rejecting a sibling zeroes its token, which no other sibling reads (a drafter's siblings hold
    # distinct tokens; a repeat finds its token zeroed: p(x) = 0). So sibling s sees its own p(x),
    # and the residual mass is the row's mass less the p(x) of the siblings rejected before it.
    # All siblings of all nodes are decided at once on [N, k] values, with no copy of the [N, V]
    # distributions and no loop of small launches.
    children = tree.children_table()                                          # [N, k], -1 padded
    valid = children >= 0
    x = tree.tokens[children.clamp(min=0)]                                     # [N, k]
    earlier = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril(-1)
    repeat = ((x.unsqueeze(2) == x.unsqueeze(1)) & valid.unsqueeze(1) & earlier).any(dim=2)
    px = torch.where(valid & ~repeat, probs.gather(1, x), 0.0)
    mass = probs.sum(dim=1, keepdim=True) - (px.cumsum(dim=1) - px)             # residual before sibling s
    u = torch.rand(children.shape, generator=generator, device=probs.device)
    # p(x) = 0: rejected with certainty (removing it changes nothing). u * mass < px <=> u <
    # p_residual(x); a child holding all the remaining mass is accepted outright, so rounding
    # cannot leave an empty residual. The first sibling that passes is the accepted child; those
    # before it were all rejected, which is what `mass` assumed.
    passes = valid & (px > 0) & ((u * mass < px) | (mass - px <= 0))
    k = children.shape[1]
    accepted_child = torch.full((n,), -1, dtype=torch.int64, device=probs.device)
    if k > 0:  # a lone root has no children to accept
        first = torch.where(passes, torch.arange(k, device=probs.device), k).min(dim=1).values    # k: none
        accepted_child = torch.where(first < k, children.gather(1, first.clamp(max=k - 1).unsqueeze(1)).squeeze(1),
                                     accepted_child)
    end = _accepted_path_end(tree, accepted_child).reshape(1)
    # The walk stopped at `end`: every child of it was rejected, and the bonus token is drawn from
    # its distribution with all of them removed (scatter_add: padding slots repeat a token id).
    row = probs.index_select(0, end)                                                          # [1, V]
    removed = torch.zeros_like(row, dtype=torch.int32).scatter_add_(
        1, x.index_select(0, end), valid.index_select(0, end).to(torch.int32))
    row = torch.where(removed > 0, 0.0, row)
    # Non-finite logits make NaN rows: sample from a harmless row instead (no device assert), the
    # read below raises for them.
    row = row.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0)
    total = row.sum(dim=1, keepdim=True)
    row = torch.where(total > 0, row / total.clamp(min=torch.finfo(row.dtype).tiny), 1.0 / row.shape[1])
    bonus = ops.sample(row, generator)
    return _read_path(tree, end, bonus, logits)
