"""FR-Spec: a draft LM head restricted to the most frequent tokens, and its vocabulary files.

The draft's LM head is a large part of each draft step (for SmolLM2-135M, 49,152 x 576 is a
quarter of the target's weights). FR-Spec (Zhao et al., 2025) keeps only the rows of the top-V
tokens of a generic corpus (special and end-of-sequence tokens forced in) as one contiguous
V x H matrix, drafts over it and maps the ids back. Verification still uses the full vocabulary,
so the output distribution is unchanged; only tokens outside the subset can no longer be drafted.

Vocabulary files are a list of token ids, most frequent first. Read: `.json` (a list, or an
object with "token_ids"), `.pt`/`.pth` (a tensor or list, as FR-Spec's own scripts save), `.npy`,
or text with whitespace-separated ids. Written: `.json` with the ids and how they were counted.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..errors import ModelFormatError

FORMAT = "edgespec-frspec-vocab"


def load_vocab(path: str | Path, vocab_size: int) -> torch.Tensor:
    """Token ids of an FR-Spec vocabulary file: int64 [V'], validated against `vocab_size`.

    Raises ModelFormatError naming the file when it is unreadable, empty, holds non-integers,
    duplicates, or ids outside [0, vocab_size).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FR-Spec vocabulary file {str(path)!r} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data: Any = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = data.get("token_ids")
        elif suffix in (".pt", ".pth"):
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            import numpy as np  # noqa: PLC0415 - only for this format

            data = np.load(str(path), allow_pickle=False).tolist()
        else:
            data = [int(x) for x in path.read_text(encoding="utf-8").split()]
    except ModelFormatError:
        raise
    except Exception as exc:  # json, torch, numpy and int() raise many types for corrupt files
        raise ModelFormatError(f"{path}: not a readable FR-Spec vocabulary ({type(exc).__name__}: {exc})") from None
    if isinstance(data, torch.Tensor):
        if data.is_floating_point() or data.dim() != 1:
            raise ModelFormatError(f"{path}: expected a 1-D integer tensor of token ids, "
                                   f"got {data.dtype} {tuple(data.shape)}")
        data = data.tolist()
    if not isinstance(data, list) or not data:
        raise ModelFormatError(f"{path}: expected a non-empty list of token ids (or {{\"token_ids\": [...]}})")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in data):
        bad = next(i for i in data if not isinstance(i, int) or isinstance(i, bool))
        raise ModelFormatError(f"{path}: token ids must be integers, found {bad!r}")
    return validate_ids(data, vocab_size, str(path))


def validate_ids(ids: Sequence[int], vocab_size: int, where: str = "FR-Spec vocabulary") -> torch.Tensor:
    """ids as int64 [V'] after checking range and uniqueness (ModelFormatError otherwise)."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ModelFormatError(f"{where}: token id {bad[0]} is out of range for the model's vocabulary of "
                               f"{vocab_size} ({len(bad)} id(s) out of range); was it built for another tokenizer?")
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ModelFormatError(f"{where}: token id {dup} appears more than once")
    return torch.tensor(list(ids), dtype=torch.int64)


def save_vocab(path: str | Path, ids: Sequence[int], vocab_size: int, **meta: Any) -> Path:
    """Write ids (most frequent first) as an FR-Spec vocabulary JSON file with `meta`."""
    validate_ids(ids, vocab_size, str(path))
    doc = {"format": FORMAT, "vocab_size": vocab_size, "size": len(ids), **meta, "token_ids": list(ids)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    return path


def count_tokens(encode: Any, texts: Iterable[str], vocab_size: int) -> torch.Tensor:
    """Token frequencies: int64 [vocab_size] counts of `encode(text)` ids over `texts`."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for text in texts:
        ids = torch.tensor(encode(text), dtype=torch.int64)
        if ids.numel():
            if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
                raise ValueError(f"the tokenizer produced id {int(ids.max())} outside the vocabulary of {vocab_size}")
            counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def select_vocab(counts: torch.Tensor, size: int, forced: Iterable[int] = ()) -> list[int]:
    """The FR-Spec subset: `forced` ids first, then the most frequent others (ties: lower id first),
    `size` ids in all; tokens never seen are not included. counts: int64 [V]."""
    if size <= 0:
        raise ValueError(f"the FR-Spec vocabulary size must be positive, got {size}")
    forced_ids = list(dict.fromkeys(int(i) for i in forced))
    vocab = counts.numel()
    bad = [i for i in forced_ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"forced token id {bad[0]} is outside the vocabulary of {vocab}")
    if len(forced_ids) > size:
        raise ValueError(f"{len(forced_ids)} special tokens must be kept but the vocabulary size is only {size}")
    order = torch.sort(counts, descending=True, stable=True).indices.tolist()
    chosen = set(forced_ids)
    out = list(forced_ids)
    for i in order:
        if len(out) >= size or counts[i] <= 0:
            break
        if i not in chosen:
            out.append(i)
            chosen.add(i)
    return out


def dense_weight(linear: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [N, K], bias [N] or None) of any Linear-like projection.

    Dense projections expose theirs; others (quantized heads) are materialised once by applying
    them to the identity, which costs one [K, K] x [K, N] product.
    """
    weight = getattr(linear, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point():
        return weight, getattr(linear, "bias", None)
    k = linear.in_features
    probe = getattr(linear, "dtype", None) or torch.float32
    device = getattr(linear, "device", None) or "cpu"
    zero = linear(torch.zeros(1, k, dtype=probe, device=device))        # [1, N]: the bias
    cols = linear(torch.eye(k, dtype=probe, device=device)) - zero      # [K, N]
    bias = zero[0] if bool(zero.abs().max() > 0) else None
    return cols.t().contiguous(), bias


class DraftLMHead:
    """Draft logits over a (sub)vocabulary: the rows of an LM head kept as one contiguous matrix.

    weight: [Vd, H] rows of the draft vocabulary (all of the target's, an EAGLE-3 head's own, or
            an FR-Spec subset of either); bias: [Vd] or None; scale multiplies the hidden state first
            (MiniCPM's logit scale); token_map: int64 [Vd] target id of each row, or None when row i
            is target id i.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0,
                 token_map: torch.Tensor | None = None) -> None:
        if token_map is not None and token_map.shape != (weight.shape[0],):
            raise ValueError(f"DraftLMHead: token_map {tuple(token_map.shape)} does not match {weight.shape[0]} rows")
        self.weight = weight
        self.bias = bias
        self.scale = scale
        self.token_map = token_map

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> logits [T, Vd] fp32."""
        if self.scale != 1.0:
            hidden = hidden * self.scale
        return torch.nn.functional.linear(hidden, self.weight, self.bias).float()

    def restrict(self, target_ids: torch.Tensor, where: str = "FR-Spec vocabulary") -> "DraftLMHead":
        """A head over the rows whose target ids are in `target_ids` ([V'] int64), in that order
        when this head covers the full target vocabulary, otherwise in this head's row order."""
        if self.token_map is None:
            if target_ids.numel() and int(target_ids.max()) >= self.vocab_size:
                raise ModelFormatError(f"{where}: token id {int(target_ids.max())} is out of range for the "
                                       f"draft vocabulary of {self.vocab_size}")
            rows = target_ids.to(self.weight.device)
            mapping = rows
        else:
            wanted = torch.zeros(int(max(int(self.token_map.max()), int(target_ids.max()))) + 1, dtype=torch.bool)
            wanted[target_ids.cpu()] = True
            rows = torch.nonzero(wanted[self.token_map.cpu()]).flatten().to(self.weight.device)
            if rows.numel() == 0:
                raise ModelFormatError(f"{where}: none of its tokens is in the draft head's vocabulary")
            mapping = self.token_map[rows]
        bias = None if self.bias is None else self.bias[rows].contiguous()
        return DraftLMHead(self.weight[rows].contiguous(), bias, self.scale, mapping.to(self.weight.device))
