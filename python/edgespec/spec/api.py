"""Turning speculative decoding on and off for an LLM, with per-precision default tree shapes."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelFormatError
from ..ops import w4a16_cpu
from ..ops.linear import INVARIANT_ROWS, DenseLinear
from .decoding import cache_slack, speculative_factory
from .draft_model import ModelDrafter, check_same_vocabulary
from .drafter import Drafter
from .eagle import CONFIG_KEY, EagleDrafter, is_eagle_head, load_eagle_head
from .frspec import load_vocab
from .ngram import NgramDrafter
from .tree import TreeSettings

if TYPE_CHECKING:
    from ..engine import LLM
    from ..models.decoder import Decoder

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
NGRAM = "ngram"  # the `draft` that selects prompt lookup
# The EAGLE head trained for the demo model (SmolLM2-135M-Instruct) with `edgespec train-draft`.
DEMO_HEAD = DATA_DIR / "smollm2-135m-instruct-eagle"

# Tree shapes per target kind (tree_size, depth, topk). Verifying T tokens costs about one
# decode step while the weights dominate: on a GPU with bf16 weights that holds for hundreds of
# tokens (EAGLE-2's reference 60 / 6 / 10), with 4-bit weights for a few dozen; on a CPU the
# matmuls of a 135M model grow with T sooner, and the draft's own steps are a larger share.
# The CPU entry: bench_spec.py --sweep on bench/python/prompts-tuning.jsonl (16 prompts disjoint
# from the benchmark's; SmolLM2 + head v9, bf16, 1 thread; head v10 accepts the same there), mean
# accepted length / speedup, two runs: 12,4,4 2.73 / 1.91x; 12,8,4 2.87 / 1.92x, 1.89x; 10,8,4
# 2.80 / 2.03x, 1.90x; 8,8,4 2.69 / 2.00x; 10,8,3 2.74 / 1.87x (run-to-run noise about 5%).
# Since build_tree stops growing once no deeper node can enter the tree, a deep limit costs draft
# rounds only where the draft is sure of a long run (3.8 rounds per step on average at depth 8
# against 2.9 at depth 4), so depth 8 buys +0.14 tokens per step for no measurable speed; the
# size stays where more verified tokens stop paying for themselves.
#
# The cpu-quantized entry: 4-bit weights on torch's CPU int4 kernel (ops/w4a16_cpu.py), whose
# time grows with the row count from a few rows on (SmolLM2 Q4_1, one forward: M=1 29.4 ms, M=4
# 31.0, M=13 61.0 against 58.1 / 59.3 / 62.9 dense: cpu_w4a16-cpu.json), so a verified token
# costs several times what it does with dense weights and small trees win. The same sweep with
# the demo loaded 4-bit: 12,8,4 2.98 / 0.90x; 8,8,4 2.79 / 1.03x; 6,6,3 2.63 / 1.21x; 5,5,2
# 2.47 / 1.14x; 4,4,2 2.31 / 1.17x; 3,3,2 2.16 / 1.32x, 1.31x; 3,3,1 2.10 / 1.25x; 2,2,1 1.92 /
# 1.31x (speedups over plain 4-bit decoding, itself about twice as fast as dense: cpu_w4a16-cpu.json);
# on the benchmark's own prompts 3,3,2 gives 1.99 / 1.27x (spec-cpu.json, 24 prompts), and 2.39 / 1.37x
# with its lookup chains (spec_lookup-cpu.json).
#
# lookup (a prompt-lookup chain grafted onto each tree, spec.ngram GRAFT_MIN_N): the same sweeps on
# prompts-tuning-grounded.jsonl (edits and quotes) / prompts-tuning.jsonl (5 chat + 5 continuations).
# Dense bf16, 12,8,4: lookup 0 1.53x / 1.91x; 4 2.15x / 2.00x; 8 2.21x / 2.06x. 4-bit, 3,3,2: lookup 0
# 1.08x / 1.37x; 6 1.35x / 1.42x. The chain costs rows only where the sequence repeats, and there it
# is what the head cannot guess. On a GPU it stays off until measured: a 60-token tree and its root
# are 61 rows, and past 64 the row-invariant dense projections read their weights twice.
DEFAULT_SETTINGS = {
    "cpu": TreeSettings(tree_size=12, depth=8, topk=4, lookup=8),
    "cpu-quantized": TreeSettings(tree_size=3, depth=3, topk=2, lookup=6),
    "cuda": TreeSettings(tree_size=60, depth=6, topk=10),
    "cuda-quantized": TreeSettings(tree_size=24, depth=5, topk=8),
}


# Prompt lookup (spec.ngram) drafts nothing where nothing matched and costs no draft rounds: a
# chain of the most recent continuation on a CPU, a few continuations on a GPU (untuned there).
# CPU entries: bench_spec.py --draft ngram --sweep on prompts-tuning-grounded.jsonl (5 edit and quote
# requests, none of the benchmark's), demo, 1 thread, speedup over plain decoding: dense bf16 3,3,1
# 1.64x; 6,6,1 1.71x; 8,8,1 1.75x; 8,4,2 1.69x. 4-bit (the int4 kernel's time grows with the rows)
# 2,2,1 1.40x; 3,3,1 1.47x; 4,4,1 1.39x; 6,6,1 1.40x; 8,8,1 1.35x; 6,3,2 1.42x; on prompts-tuning.jsonl
# (general chat and continuations, 5 of each) 2,2,1 1.28x; 4,4,1 1.17x; 8,8,1 1.06x.
NGRAM_SETTINGS = {
    "cpu": TreeSettings(tree_size=8, depth=8, topk=1),
    "cpu-quantized": TreeSettings(tree_size=3, depth=3, topk=1),
    "cuda": TreeSettings(tree_size=24, depth=12, topk=2),
    "cuda-quantized": TreeSettings(tree_size=16, depth=8, topk=2),
}


def _is_quantized(model: "Decoder") -> bool:
    return not isinstance(model.layers[0].qkv, DenseLinear)


def default_settings(model: "Decoder", ngram: bool = False) -> TreeSettings:
    """The default tree shape for a target on its device and precision (DEFAULT_SETTINGS, or
    NGRAM_SETTINGS for prompt lookup)."""
    table = NGRAM_SETTINGS if ngram else DEFAULT_SETTINGS
    if model.device.type == "cuda":
        return table["cuda-quantized" if _is_quantized(model) else "cuda"]
    # 4-bit weights the CPU dequantises (fp16/fp32 compute) cost what dense ones do.
    int4 = _is_quantized(model) and w4a16_cpu.runs_dtype(model.dtype)
    return table["cpu-quantized" if int4 else "cpu"]


def _head_frspec(path: Path) -> Path | None:
    """The FR-Spec vocabulary a head's config names (edgespec_draft.frspec_vocab), if any."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8")).get(CONFIG_KEY) or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    name = meta.get("frspec_vocab") if isinstance(meta, dict) else None
    return (path / name) if name else None


def _tokenizer_or_none(model: str) -> Any:
    """The tokenizer of a model path, or None when it has no tokenizer files (then only the
    vocabulary size can be compared)."""
    from ..loading import Tokenizer, open_checkpoint  # noqa: PLC0415

    _, _, tok_dir, tok_gguf = open_checkpoint(model)
    try:
        return Tokenizer.from_pretrained(tok_dir, gguf_file=tok_gguf)
    except ModelFormatError:
        return None


def load_drafter(draft: Any, llm: "LLM", frspec_vocab: str | Path | None = None) -> Drafter:
    """A drafter for llm's model from `draft`: a Drafter, "ngram" (prompt lookup, spec.ngram), an
    EAGLE-1/2/3 head directory, or a standalone draft model (directory, .gguf or 'demo') that shares
    the target's tokenizer.

    frspec_vocab: None uses the vocabulary the head's config names (if any), "none" the full draft
    vocabulary, otherwise an FR-Spec vocabulary file restricting the draft LM head.
    """
    target = llm.model
    default_vocab = None
    if hasattr(draft, "advance") and (hasattr(draft, "expand") or hasattr(draft, "draft_tree")):
        drafter = draft
    elif draft == NGRAM:
        drafter = NgramDrafter()
    else:
        path = str(draft)
        if path != "demo" and not Path(path).exists():
            raise FileNotFoundError(f"draft {path!r} not found: pass an EAGLE head directory, a draft model "
                                    f"(directory or .gguf), 'demo' or '{NGRAM}'")
        if path != "demo" and Path(path).is_dir() and is_eagle_head(path):
            head = load_eagle_head(path, target)
            drafter = EagleDrafter(head, name=f"eagle{'3' if head.kind == 'eagle3' else ''}:{Path(path).name}")
            default_vocab = _head_frspec(Path(path))
        else:
            from ..loading import load_model  # noqa: PLC0415 - avoid an import cycle at package import

            loaded = load_model(path, device=target.device, dtype=target.dtype, max_context=target.max_context,
                                with_tokenizer=False)
            draft_tok = _tokenizer_or_none(path) if llm.tokenizer is not None else None
            check_same_vocabulary(target, loaded.model, llm.tokenizer, draft_tok, where=f"draft model {path}")
            # The draft only proposes: its attention needs no row invariance (the fast path).
            loaded.model.row_invariant_attention = False
            drafter = ModelDrafter(loaded.model, name=f"model:{Path(path).name}")
    vocab = default_vocab if frspec_vocab is None else (None if str(frspec_vocab).lower() == "none" else frspec_vocab)
    if vocab is not None and not hasattr(drafter, "lm_head"):
        raise ValueError(f"an FR-Spec vocabulary restricts a draft's LM head; the {drafter.name} drafter has none")
    if vocab is not None:
        ids = load_vocab(vocab, target.config.vocab_size)
        drafter.lm_head = drafter.lm_head.restrict(ids, where=str(vocab))
        drafter.name += f"+frspec{ids.numel()}"
    return drafter


def enable_speculation(llm: "LLM", draft: Any = "auto", tree_size: int | None = None, depth: int | None = None,
                       topk: int | None = None, frspec_vocab: str | Path | None = None,
                       lookup: int | None = None) -> TreeSettings | None:
    """Install speculative decoding on `llm` (its generate/stream then draft and verify trees).

    draft: "auto" (the head shipped for the model: the demo model only; otherwise speculation
    stays off), None (off), "ngram" (prompt lookup: no draft model), a Drafter, an EAGLE head
    directory or a draft model path.
    tree_size/depth/topk: the tree shape (defaults: default_settings for the target).
    frspec_vocab: see load_drafter.
    lookup: up to this many prompt-lookup tokens grafted onto a draft model's tree at each step
    (TreeSettings.lookup; default: default_settings', on a GPU none yet).
    Returns the settings in use, or None when speculation is off.
    """
    if draft == "auto":
        draft = DEMO_HEAD if llm.name == "demo" and DEMO_HEAD.is_dir() else None
    if draft is None:
        disable_speculation(llm)
        return None
    ngram = draft == NGRAM or isinstance(draft, NgramDrafter)
    if ngram and lookup:
        raise ValueError("lookup grafts prompt lookup onto a draft model's trees; with draft='ngram' the trees are "
                         "prompt lookup's already (size them with tree_size/depth/topk)")
    base = default_settings(llm.model, ngram=ngram)
    settings = TreeSettings(tree_size=base.tree_size if tree_size is None else tree_size,
                            depth=base.depth if depth is None else depth,
                            topk=base.topk if topk is None else topk,
                            lookup=base.lookup if lookup is None else lookup).validate()
    if settings.verified > llm.max_context:
        raise ValueError(f"tree_size {settings.tree_size}{f' + lookup {settings.lookup}' if settings.lookup else ''} "
                         f"does not fit a context of {llm.max_context}")
    if settings.verified > INVARIANT_ROWS:
        logger.warning("tree_size %d, lookup %d: a tree and its root verify as up to %d rows, more than the %d that "
                       "the projections keep row-invariant, so greedy output equals plain decoding's only up to "
                       "rounding (a near tie may go the other way); %d rows or fewer keep it token for token",
                       settings.tree_size, settings.lookup, settings.verified, INVARIANT_ROWS, INVARIANT_ROWS)
    drafter = load_drafter(draft, llm, frspec_vocab)
    llm.set_strategy(speculative_factory(drafter, settings), cache_slack=cache_slack(settings))
    return settings


def disable_speculation(llm: "LLM") -> None:
    """Back to plain decoding (one target forward per token)."""
    from ..generation import PlainDecoding  # noqa: PLC0415

    llm.set_strategy(PlainDecoding)


def speculation_info(llm: "LLM") -> dict[str, Any] | None:
    """{"draft", "tree_size", "depth", "topk", "lookup"} of the installed speculative strategy, or None."""
    factory = llm._strategy_factory
    drafter = getattr(factory, "drafter", None)
    if drafter is None:
        return None
    s: TreeSettings = factory.settings
    return {"draft": drafter.name, "tree_size": s.tree_size, "depth": s.depth, "topk": s.topk, "lookup": s.lookup}

