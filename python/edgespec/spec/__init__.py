"""Speculative decoding: EAGLE-1/2/3 heads, draft models and prompt lookup (n-gram drafts), EAGLE-2
trees, lossless verification, FR-Spec vocabularies and draft-head training.

    from edgespec import LLM
    from edgespec.spec import enable_speculation
    llm = LLM.load("model_dir")
    enable_speculation(llm, draft="eagle_head_dir", tree_size=16, depth=5, topk=4)
"""
from .accept import accept_greedy, accept_sampling
from .api import (DEFAULT_SETTINGS, DEMO_HEAD, default_settings, disable_speculation, enable_speculation,
                  load_drafter, speculation_info)
from .decoding import SpeculativeDecoding, cache_slack, speculative_factory
from .draft_model import ModelDrafter
from .drafter import Drafter, TargetStates
from .eagle import EagleDrafter, EagleHead, load_eagle_head
from .frspec import DraftLMHead, load_vocab
from .ngram import NgramDrafter
from .tree import DraftTree, ExpandBatch, TreeSettings, build_tree

__all__ = [
    "DEFAULT_SETTINGS", "DEMO_HEAD", "DraftLMHead", "DraftTree", "Drafter", "EagleDrafter", "EagleHead", "ExpandBatch",
    "ModelDrafter", "NgramDrafter", "SpeculativeDecoding", "TargetStates", "TreeSettings", "accept_greedy", "accept_sampling",
    "build_tree", "cache_slack", "default_settings", "disable_speculation", "enable_speculation", "load_drafter",
    "load_eagle_head", "load_vocab", "speculation_info", "speculative_factory",
]
