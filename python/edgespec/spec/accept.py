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

import torch

from .. import ops
from ..generation import checked_tokens
from .tree import DeviceTree, DraftTree


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Longest path whose every token is the target's argmax after its parent.

    logits: [N, V] float target logits, row i = distribution after node i.
    Returns (accepted node indices starting with the root, bonus token id).
    """
    best = checked_tokens(ops.argmax(logits), logits)  # one host sync for the whole tree
    node = 0
    path = [0]
    while True:
        want = best[node]
        nxt = next((c for c in tree.children[node] if tree.tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


def accept_greedy_on_device(tree: DeviceTree, logits: torch.Tensor) -> tuple[list[int], list[int], int]:
    """accept_greedy on a DeviceTree with one host read (the path and the bonus token).

    A node is accepted when its token is the target's argmax after its parent and its parent is
    accepted; siblings hold distinct tokens (top-k of one distribution), so the accepted nodes form
    one path from the root, and its deepest node is where the walk stops.
    Returns (accepted node indices starting with the root, their tokens, bonus token id).
    """
    best = ops.argmax(logits)                                                  # [N]
    match = tree.tokens == best[tree.parents.clamp(min=0)]
    match[0] = True
    accepted = match
    step = tree.parents.clamp(min=0)
    for _ in range(tree.max_depth):  # a node stays accepted while its ancestors all are
        accepted = accepted & accepted[step]
    end = torch.where(accepted, tree.depths, -1).argmax()
    path_bits = tree.visible[end]
    n = tree.size
    values = checked_tokens(torch.cat([path_bits.long(), tree.tokens, best[end].reshape(1)]), logits)
    path = [i for i in range(n) if values[i]]
    return path, [values[n + i] for i in path], values[-1]


def accept_sampling(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """Lossless recursive rejection sampling over the tree (module docstring).

    probs: [N, V] fp32 target sampling distributions (ops.logits_to_probs of the verify logits).
    generator: the engine's seeded generator (same device as probs), so seeded runs reproduce.
    Returns (accepted node indices starting with the root, bonus token id).
    """
    node = 0
    path = [0]
    while True:
        residual = probs[node].clone()  # unnormalised: rejected children are zeroed
        accepted = None
        for child in tree.children[node]:
            x = tree.tokens[child]
            px = float(residual[x])
            if px <= 0.0:
                continue  # p(x) = 0: rejected with certainty; removing it changes nothing
            mass = float(residual.sum())
            u = float(torch.rand((), generator=generator, device=probs.device))
            # u * mass < px  <=>  u < p_residual(x); when x holds all the remaining mass it is
            # accepted outright so rounding cannot leave an empty residual.
            if u * mass < px or mass - px <= 0.0:
                accepted = child
                break
            residual[x] = 0.0
        if accepted is None:
            bonus = int(ops.sample((residual / residual.sum()).unsqueeze(0), generator)[0])
            return path, bonus
        path.append(accepted)
        node = accepted
