"""Text that arrives in pieces: how much of its end may still grow into a marker (a stop string, a
tool call's opening tag, the tag that closes a reasoning section), and so must be held back from a
stream until the next piece decides."""
from __future__ import annotations


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `marker` (0: none)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
