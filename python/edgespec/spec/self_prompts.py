"""Chat prompts written by the target itself, for draft training without a prompt dataset.

A chat model has learned what its users ask. Given its chat template up to the start of a user
turn (the "pre-query template") and sampled, it writes a user message — the Magpie method (Xu et
al., 2024, "Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned LLMs with Nothing").
Many such messages are prompts from the distribution the model was tuned to answer, broader than
hand-made templates; the draft head then trains on the model's own answers to them.

Left alone, a small model opens most turns the same few ways (SmolLM2-135M-Instruct starts 67% of
them with "Can you" or "I'm ..."), so requests phrased as commands or questions ("Write ...",
"Why ...") are rare. Openers fix the first words of each turn (drawn at random from a list) and let
the model write the rest: the topics stay the model's own, the phrasings get broader.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..errors import ModelFormatError
from .batch_generate import generate_batch
from .train import Prompt

if TYPE_CHECKING:
    from ..engine import LLM
    from ..loading import Tokenizer

_SENTINEL = "EDGESPEC_USER_TURN_7f3a"


def user_turn_prefix(tokenizer: "Tokenizer") -> list[int]:
    """Token ids of the chat template up to where a user's first message starts (system prompt
    included when the template adds a default one)."""
    if not tokenizer.has_chat_template:
        raise ModelFormatError(f"{tokenizer.source}: sampling user prompts needs a chat template")
    text = tokenizer.hf.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                            add_generation_prompt=False)
    cut = text.find(_SENTINEL)
    if cut <= 0:
        raise ModelFormatError(f"{tokenizer.source}: the chat template puts no marker before the user's text, "
                               "so a user turn cannot be started on its own")
    return tokenizer.encode(text[:cut], add_special_tokens=False)


def cached_user_prompts(tokenizer: "Tokenizer", seqs: list, kind: str) -> list[Prompt]:
    """The user messages of labelled chat sequences of `kind` (prompt + answer, as the chat
    template lays them out): the inverse of answering sampled prompts, so a later run can top a
    cache up or hold new samples apart from the ones it has."""
    skip = len(user_turn_prefix(tokenizer))
    stop = set(tokenizer.stop_token_ids)
    out = []
    for s in seqs:
        if s.kind == kind:
            ids = s.tokens.tolist()[skip:]
            end = next((i for i, t in enumerate(ids) if t in stop), len(ids))
            out.append(Prompt(tokenizer.decode(ids[:end], skip_special_tokens=True).strip()))
    return out


def _key(text: str) -> str:
    return " ".join(text.casefold().split())


def sample_user_prompts(llm: "LLM", count: int, temperature: float = 0.8, max_tokens: int = 64,
                        batch: int = 32, seed: int = 0, exclude: Sequence[Prompt] = (),
                        openers: Sequence[str] = (), progress: bool = True) -> list[Prompt]:
    """Up to `count` distinct chat prompts sampled from the target at `temperature`; each starts
    with one of `openers` (chosen at random per sample) when they are given.

    A sample is kept when the model ended the user turn within max_tokens (a turn cut short is
    not a question it finished), holds at least three words, and differs (case and spacing
    aside) from the others and from `exclude` (e.g. the training prompts, when sampling held-out
    ones). Gives up after 4x the batches `count` needs, returning what it has: a model that rarely
    ends its turns yields fewer prompts, never an endless loop."""
    if count < 0 or batch < 1 or max_tokens < 1 or temperature <= 0:
        raise ValueError(f"sample_user_prompts: need count >= 0, batch >= 1, max_tokens >= 1 and temperature > 0 "
                         f"(got {count}, {batch}, {max_tokens}, {temperature})")
    tok = llm.tokenizer
    if tok is None:
        raise ValueError("sampling user prompts needs the model's tokenizer")
    if any(not o.strip() for o in openers):
        raise ValueError("sample_user_prompts: an opener is empty")
    prefix = user_turn_prefix(tok)
    starts = [tok.encode(o.strip(), add_special_tokens=False) for o in openers] or [[]]
    stop = set(tok.stop_token_ids) | set(llm.model.config.eos_token_ids)
    gen = torch.Generator(device=llm.model.device).manual_seed(seed)
    pick = torch.Generator().manual_seed(seed)  # on the CPU: the opener draw is the same on any device
    seen = {_key(p.text) for p in exclude}
    out: list[Prompt] = []
    rows = min(batch, max(count, 1))
    bar = tqdm(total=count, desc=f"sampling user prompts (T={temperature})", disable=not progress)
    for _ in range(4 * -(-count // rows)):
        if len(out) >= count:
            break
        heads = [starts[i] for i in torch.randint(len(starts), (rows,), generator=pick).tolist()]
        for head, ids in zip(heads, generate_batch(llm.model, [prefix + h for h in heads], max_tokens, sorted(stop),
                                                   temperature=temperature, generator=gen)):
            if not ids or ids[-1] not in stop:
                continue
            text = tok.decode(head + ids[:-1], skip_special_tokens=True).strip()
            if len(text.split()) < 3 or _key(text) in seen or len(out) >= count:
                continue
            seen.add(_key(text))
            out.append(Prompt(text))
            bar.update(1)
    bar.close()
    return out
