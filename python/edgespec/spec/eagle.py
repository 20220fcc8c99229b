"""EAGLE draft heads: EAGLE-1/2 and EAGLE-3, loaded from the formats their authors publish.

EAGLE-1/2 (`fc.weight` [H, 2H] (+ bias), `layers.N.*`): the draft input at position i is
fc(cat(embed(x[i+1]), f[i])) where f[i] is the target's final (normed) hidden state, followed by
Llama decoder layers whose first one has no input norm; the output is a predicted feature f[i+1]
that goes through the *target's* LM head. Deeper draft steps feed the predicted feature back in.

EAGLE-3 (`fc.weight` [H, 3H], `midlayer.*`, `norm`, `lm_head` [Vd, H], `d2t`, `t2d`): the first
draft input fuses three target layers (the residual streams entering layers 2, L/2 and L-3 unless
the config names others) with fc; the single layer attends over
cat(input_layernorm(embed(x)), hidden_norm(state)) of width 2H and its residual output is the
state of the next step; logits come from its own LM head over a reduced vocabulary whose ids map
to target ids as `target = draft + d2t[draft]`.

Our EAGLE-1/2 heads may also fuse lower target layers into the feature (train_head.py):
f[i] + fuse.proj(cat(rms(s_1[i]) , ..., rms(s_n[i])) * fuse.norm), where s_j is the residual stream
entering layer `fuse_layers[j]` of config.json's edgespec_draft block (`fuse.norm.weight` [n*H],
`fuse.proj.weight` [H, n*H]).

Both share the target's token embedding (and EAGLE-1/2 its LM head), so a head is tied to one
target's hidden size and vocabulary; loading checks both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import ops
from ..errors import ModelFormatError
from ..kv_cache import KVCache, common_prefix
from ..loading.hf_dir import HFDirectorySource, read_json
from ..models.config import ModelConfig, config_from_hf
from ..models.decoder import Decoder, GatedMLP, device_length
from ..ops.linear import DenseLinear, fuse_linears
from .drafter import SlotParking, TargetStates
from .frspec import DraftLMHead, dense_weight
from .tree import ExpandBatch

EAGLE = "eagle"    # EAGLE-1 / EAGLE-2 (same head; EAGLE-2 changed only the tree)
EAGLE3 = "eagle3"
CONFIG_KEY = "edgespec_draft"  # our own metadata in a head's config.json


@dataclass
class HeadLayer:
    """One decoder layer of a draft head.

    attn_norm is None for an EAGLE-1/2 first layer (fc's output goes straight to attention);
    hidden_norm is set only for EAGLE-3 (it normalises the incoming state before concatenation,
    which is why the EAGLE-3 qkv projection reads 2H features).
    """

    qkv: Any                       # Hin -> (Hq + 2 Hkv) * D
    o: Any                         # Hq * D -> H
    ffn_norm: torch.Tensor         # [H]
    ffn: GatedMLP
    attn_norm: torch.Tensor | None = None
    hidden_norm: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


class EagleHead:
    """An EAGLE head bound to its target (embedding, LM head and features come from the target)."""

    def __init__(self, kind: str, config: ModelConfig, fc: DenseLinear, layers: list[HeadLayer],
                 lm_head: DraftLMHead, target: Decoder, capture: tuple[int, ...],
                 norm: torch.Tensor | None = None, norm_before_residual: bool = False,
                 source: str = "<head>", fuse: tuple[torch.Tensor, DenseLinear] | None = None) -> None:
        self.kind = kind
        self.config = config
        self.fc = fc
        self.layers = layers
        self.lm_head = lm_head
        self.norm = norm
        self.norm_before_residual = norm_before_residual
        # The streams features() reads, in order: EAGLE-3's three fc fuses; EAGLE-1/2's final stream
        # and then any lower layers it fuses.
        self.fused_layers = capture
        self.fuse = fuse                              # EAGLE-1/2 with fused lower layers: (norm, proj)
        self.capture = tuple(dict.fromkeys(capture))  # distinct layers the target must capture
        self.source = source
        self.embed = target.embed                  # [V, H], shared with the target
        self.target_norm = target.final_norm       # [H] (EAGLE-1/2 features are the normed stream)
        self.target_eps = target.config.rms_norm_eps
        # The head's layers as a Decoder, for its attention block (RoPE, cache writes, the one
        # attention op); draft positions stay below the target's, so the same context suffices.
        self.core = Decoder(config, target.embed, layers, norm if norm is not None else target.final_norm,
                            target.lm_head, target.max_context)
        self.core.row_invariant_attention = False  # a draft only proposes: the fast attention path

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def new_cache(self, max_len: int) -> KVCache:
        c = self.config
        return KVCache(len(self.layers), max_len, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    def features(self, target: TargetStates) -> torch.Tensor:
        """The draft state the target hands over: [a, H] in the head's dtype."""
        if self.kind == EAGLE:
            final, *lower = self.fused_layers
            f = ops.rms_norm(target.captured[final], self.target_norm, self.target_eps).to(self.dtype)
            if self.fuse is None:
                return f
            weight, proj = self.fuse
            h = self.config.hidden_size
            parts = [ops.rms_norm(target.captured[layer].to(self.dtype), weight[j * h:(j + 1) * h],
                                  self.config.rms_norm_eps) for j, layer in enumerate(lower)]
            return f + proj(torch.cat(parts, dim=-1))
        fused = torch.cat([target.captured[i] for i in self.fused_layers], dim=-1).to(self.dtype)  # [a, 3H]
        return self.fc(fused)

    def forward(self, tokens: torch.Tensor, states: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                start: int | torch.Tensor, tree_mask: torch.Tensor | None = None,
                cache_view: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run T (token, state) pairs through the head, writing K/V at cache slots [start, start + T).

        tokens: [T] int64 target ids; states: [T, H] (target features or the head's own outputs);
        positions: [T] int64; tree_mask: None (causal) or packed int64 [T, ceil(T/64)];
        start, cache_view: as Decoder.forward takes them (a device-side start for CUDA graphs).
        Returns (hidden for the LM head [T, H], state for the next draft step [T, H]).
        """
        eps = self.config.rms_norm_eps
        seqlen = device_length(start, tokens.shape[0])
        emb = ops.embedding(tokens, self.embed, check=False)                 # [T, H]
        if self.kind == EAGLE:
            x = self.fc(torch.cat([emb, states.to(emb.dtype)], dim=-1))      # [T, H]
            h, residual = x, x
        else:
            layer = self.layers[0]
            normed = ops.rms_norm(states, layer.hidden_norm, eps)
            residual = normed if self.norm_before_residual else states
            h = torch.cat([ops.rms_norm(emb, layer.attn_norm, eps), normed], dim=-1)  # [T, 2H]
        m = None
        for i, layer in enumerate(self.layers):
            if m is not None:
                h, residual = ops.rms_norm(m, layer.attn_norm, eps, residual=residual)
            a = self.core._attention(i, layer, h, positions, cache, start, tree_mask, seqlen, cache_view)
            h, residual = ops.rms_norm(a, layer.ffn_norm, eps, residual=residual)
            m = layer.ffn(h)
        out = m + residual                                                    # [T, H]
        if self.kind == EAGLE:
            return out, out
        return ops.rms_norm(out, self.norm, eps), out


class EagleDrafter(SlotParking):
    """Drafter protocol over an EagleHead with its own KV cache (one slot per committed position)."""

    # Its steps can be CUDA graphs: expand() honours ExpandBatch.committed and catch_up() takes
    # the committed length as a device tensor (edgespec.cuda_graphs).
    graphable = True

    def __init__(self, head: EagleHead, name: str = "eagle", prefill_chunk: int = 1024) -> None:
        self.head = head
        self.name = name
        self.capture = head.capture
        self.prefill_chunk = prefill_chunk
        self.cache: KVCache | None = None
        self._committed = 0
        self.sequence: list[int] = []

    @property
    def lm_head(self) -> DraftLMHead:
        return self.head.lm_head

    @lm_head.setter
    def lm_head(self, value: DraftLMHead) -> None:  # FR-Spec restricts the head's vocabulary
        self.head.lm_head = value

    @property
    def committed(self) -> int:
        return self._committed

    def reset(self, max_len: int) -> None:
        if self.cache is None or self.cache.max_len < max_len:
            self.cache = self.head.new_cache(max_len)
            self._committed, self.sequence = 0, []

    def reusable(self, prompt: Sequence[int]) -> int:
        return self._reusable(self._committed, self.sequence, prompt)

    @staticmethod
    def _reusable(committed: int, sequence: Sequence[int], prompt: Sequence[int]) -> int:
        # Slot i pairs token i + 1 with the target's state at i: it needs tokens 0..i + 1 unchanged.
        return max(0, min(committed, common_prefix(sequence, prompt) - 1))

    def _commit(self, tokens: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # tokens [a], states [a, H]: pair i sits at position/slot committed + i.
        hidden = state = None
        for s in range(0, tokens.numel(), self.prefill_chunk):
            part = slice(s, s + self.prefill_chunk)
            start = self._committed
            n = tokens[part].numel()
            positions = torch.arange(start, start + n, device=tokens.device)
            hidden, state = self.head.forward(tokens[part], states[part], positions, self.cache, start)
            self._committed += n
        return self.lm_head(hidden[-1:])[0], state[-1:]

    def prefill(self, prompt: torch.Tensor, first_token: int, target: TargetStates,
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.head.features(target)                                    # [P - start, H]
        nxt = torch.tensor([first_token], dtype=torch.int64, device=prompt.device)
        self._committed = start
        return self._commit(torch.cat([prompt[start + 1:], nxt]), feats)

    def advance(self, tokens: torch.Tensor, target: TargetStates) -> tuple[torch.Tensor, torch.Tensor]:
        return self._commit(tokens, self.head.features(target))

    def catch_up(self, tokens: torch.Tensor, target: TargetStates, committed: torch.Tensor,
                 cache_view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """advance() with the committed length read on the device (int64 [1]) over `cache_view`
        draft-cache slots, for a CUDA graph; it leaves the host-side length to the caller
        (note_committed), since a replay runs no Python."""
        positions = committed + torch.arange(tokens.numel(), device=tokens.device)
        hidden, state = self.head.forward(tokens, self.head.features(target), positions, self.cache, committed,
                                          cache_view=cache_view)
        return self.lm_head(hidden[-1:])[0], state[-1:]

    def note_committed(self, n: int) -> None:
        """Count `n` tokens a catch_up replay committed."""
        self._committed += n

    def expand(self, batch: ExpandBatch) -> tuple[torch.Tensor, torch.Tensor]:
        committed = self._committed if batch.committed is None else batch.committed
        start = committed + batch.slot_offset
        positions = batch.depths + (committed - 1)
        hidden, state = self.head.forward(batch.tokens, batch.states, positions, self.cache, start, batch.tree_mask,
                                          batch.cache_view)
        return self.lm_head(hidden[-batch.new:]), state[-batch.new:]


# ----------------------------------------------------------------------------------------------
# Loading


class _Renamed:
    """A weight source seen through a name prefix (checkpoints that nest the head under 'model.')."""

    def __init__(self, source: HFDirectorySource, prefix: str) -> None:
        self.source = source
        self.prefix = prefix
        self.path = source.path

    def names(self) -> list[str]:
        n = len(self.prefix)
        return [k[n:] for k in self.source.names() if k.startswith(self.prefix)]

    def has(self, name: str) -> bool:
        return self.source.has(self.prefix + name)

    def tensor(self, name: str) -> torch.Tensor:
        return self.source.tensor(self.prefix + name)


def _tensor(src: Any, name: str, shape: tuple[int, ...] | None, what: str) -> torch.Tensor:
    if not src.has(name):
        raise ModelFormatError(f"{src.path}: tensor {name!r} is missing from the {what}")
    t = src.tensor(name)
    if shape is not None and tuple(t.shape) != shape:
        raise ModelFormatError(f"{src.path}: {name} has shape {tuple(t.shape)}, expected {shape} ({what})")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ModelFormatError(f"{src.path}: {name} contains NaN or infinite values (a corrupt checkpoint?)")
    return t


def _linear(src: Any, prefix: str, out_f: int, in_f: int, device: torch.device, dtype: torch.dtype,
            what: str) -> DenseLinear:
    w = _tensor(src, prefix + ".weight", (out_f, in_f), what)
    b = _tensor(src, prefix + ".bias", (out_f,), what) if src.has(prefix + ".bias") else None
    return DenseLinear(w.to(device=device, dtype=dtype), None if b is None else b.to(device=device, dtype=dtype))


def _layer(src: Any, prefix: str, cfg: ModelConfig, in_features: int, device: torch.device, dtype: torch.dtype,
           with_attn_norm: bool, with_hidden_norm: bool, what: str) -> HeadLayer:
    h = cfg.hidden_size

    def vec(name: str, size: int = h) -> torch.Tensor:
        return _tensor(src, f"{prefix}.{name}", (size,), what).to(device=device, dtype=dtype)

    q = _linear(src, prefix + ".self_attn.q_proj", cfg.q_size, in_features, device, dtype, what)
    k = _linear(src, prefix + ".self_attn.k_proj", cfg.kv_size, in_features, device, dtype, what)
    v = _linear(src, prefix + ".self_attn.v_proj", cfg.kv_size, in_features, device, dtype, what)
    o = _linear(src, prefix + ".self_attn.o_proj", h, cfg.q_size, device, dtype, what)
    gate = _linear(src, prefix + ".mlp.gate_proj", cfg.intermediate_size, h, device, dtype, what)
    up = _linear(src, prefix + ".mlp.up_proj", cfg.intermediate_size, h, device, dtype, what)
    down = _linear(src, prefix + ".mlp.down_proj", h, cfg.intermediate_size, device, dtype, what)
    layer = HeadLayer(qkv=fuse_linears([q, k, v]), o=o, ffn_norm=vec("post_attention_layernorm.weight"),
                      ffn=GatedMLP(fuse_linears([gate, up]), down))
    if with_attn_norm:
        layer.attn_norm = vec("input_layernorm.weight")
    if with_hidden_norm:
        layer.hidden_norm = vec("hidden_norm.weight")
    if src.has(f"{prefix}.self_attn.q_norm.weight"):
        layer.q_norm = vec("self_attn.q_norm.weight", cfg.head_dim)
        layer.k_norm = vec("self_attn.k_norm.weight", cfg.head_dim)
    return layer


def _head_dir(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        p = p.parent  # a weights file was named: its config.json sits beside it
    if not p.is_dir():
        raise FileNotFoundError(f"draft head {str(path)!r} not found: pass a directory with config.json and weights")
    if not (p / "config.json").is_file():
        raise ModelFormatError(f"{p}: a draft head directory needs config.json beside its weights")
    return p


def detect_kind(names: list[str]) -> str | None:
    """EAGLE3, EAGLE or None from a checkpoint's tensor names."""
    if any(n.startswith("midlayer.") for n in names) or "d2t" in names:
        return EAGLE3
    if "fc.weight" in names and any(n.startswith("layers.") for n in names):
        return EAGLE
    return None


def is_eagle_head(path: str | Path) -> bool:
    """True when `path` looks like an EAGLE head directory (config.json + fc/layers weights)."""
    try:
        src = HFDirectorySource(_head_dir(path))
    except (ModelFormatError, FileNotFoundError):
        return False
    names = src.names()
    return detect_kind(names) is not None or detect_kind([n.removeprefix("model.") for n in names]) is not None


def load_eagle_head(path: str | Path, target: Decoder, dtype: torch.dtype | None = None) -> EagleHead:
    """Load an EAGLE-1/2 or EAGLE-3 head directory for `target` (on the target's device).

    Raises ModelFormatError naming the file and the tensor or field when the checkpoint is
    corrupt, not an EAGLE head, or built for a target of another hidden size or vocabulary.
    """
    directory = _head_dir(path)
    raw = read_json(directory / "config.json")
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{directory / 'config.json'}: expected a JSON object")
    d = dict(raw)
    d["model_type"] = d.get("model_type") or "llama"
    d.setdefault("intermediate_size", d.get("hidden_size", 0) * 4)
    cfg = config_from_hf(d, source=str(directory / "config.json"))
    src: Any = HFDirectorySource(directory)
    names = src.names()
    kind = detect_kind(names)
    if kind is None and detect_kind([n.removeprefix("model.") for n in names]) is not None:
        src = _Renamed(src, "model.")
        kind = detect_kind(src.names())
    if kind is None:
        raise ModelFormatError(f"{directory}: not an EAGLE head: expected fc.weight and layers.0.* (EAGLE-1/2) or "
                               f"midlayer.* and d2t (EAGLE-3); found {', '.join(names[:6])}...")
    tc = target.config
    device = target.device
    dtype = dtype or target.dtype
    what = f"EAGLE{'-3' if kind == EAGLE3 else '-1/2'} head for a target with hidden size {tc.hidden_size}"
    if cfg.hidden_size != tc.hidden_size:
        raise ModelFormatError(f"{directory}: the draft head has hidden_size {cfg.hidden_size} but the target's is "
                               f"{tc.hidden_size}: it was trained for another model")
    if cfg.vocab_size != tc.vocab_size:
        raise ModelFormatError(f"{directory}: the draft head's vocab_size is {cfg.vocab_size} but the target's is "
                               f"{tc.vocab_size}: it was trained for another tokenizer")
    if src.has("embed_tokens.weight"):  # some checkpoints carry a copy of the target's embedding
        _tensor(src, "embed_tokens.weight", (tc.vocab_size, tc.hidden_size), what)
    h = cfg.hidden_size
    fuse = None
    if kind == EAGLE:
        fc = _linear(src, "fc", h, 2 * h, device, dtype, what)
        layers = [_layer(src, f"layers.{i}", cfg, h, device, dtype, i > 0, False, what)
                  for i in range(cfg.num_layers)]
        w, b = dense_weight(target.lm_head)
        lm_head = DraftLMHead(w, b, tc.logit_scale)
        fuse_layers = _fuse_layers(d, tc.num_layers, directory)
        capture = (tc.num_layers, *fuse_layers)
        norm = None
        if fuse_layers:
            n = len(fuse_layers)
            fuse = (_tensor(src, "fuse.norm.weight", (n * h,), what).to(device=device, dtype=dtype),
                    _linear(src, "fuse.proj", h, n * h, device, dtype, what))
        elif src.has("fuse.proj.weight"):
            raise ModelFormatError(f"{directory}: the head has fuse.* tensors but config.json names no "
                                   f"{CONFIG_KEY}.fuse_layers to read them from")
    else:
        target_hidden = int(d.get("target_hidden_size") or tc.hidden_size)
        if target_hidden != tc.hidden_size:
            raise ModelFormatError(f"{directory}: target_hidden_size {target_hidden} != the target's hidden size "
                                   f"{tc.hidden_size}")
        fc = _linear(src, "fc", h, 3 * tc.hidden_size, device, dtype, what)
        prefix = "midlayer" if src.has("midlayer.self_attn.q_proj.weight") else "layers.0"
        layers = [_layer(src, prefix, cfg, 2 * h, device, dtype, True, True, what)]
        norm = _tensor(src, "norm.weight", (h,), what).to(device=device, dtype=dtype)
        draft_vocab = int(d.get("draft_vocab_size") or cfg.vocab_size)
        head_w = _tensor(src, "lm_head.weight", (draft_vocab, h), what).to(device=device, dtype=dtype)
        if src.has("d2t"):
            d2t = _tensor(src, "d2t", (draft_vocab,), what).to(torch.int64)
            token_map = torch.arange(draft_vocab, dtype=torch.int64) + d2t
        elif draft_vocab == tc.vocab_size:
            token_map = torch.arange(draft_vocab, dtype=torch.int64)
        else:
            raise ModelFormatError(f"{directory}: draft_vocab_size {draft_vocab} differs from the target's "
                                   f"{tc.vocab_size} but the checkpoint has no d2t map")
        bad = token_map[(token_map < 0) | (token_map >= tc.vocab_size)]
        if bad.numel():
            raise ModelFormatError(f"{directory}: d2t maps a draft id to target id {int(bad[0])}, outside the "
                                   f"target vocabulary of {tc.vocab_size}")
        if src.has("t2d"):
            _tensor(src, "t2d", (tc.vocab_size,), what)
        lm_head = DraftLMHead(head_w, None, float(d.get("logit_scale", 1.0)), token_map.to(device))
        capture = _eagle3_layers(d, tc.num_layers, directory)
    return EagleHead(kind, cfg, fc, layers, lm_head, target, capture, norm=norm,
                     norm_before_residual=bool(d.get("norm_before_residual", False)), source=str(directory),
                     fuse=fuse)


def _fuse_layers(d: dict[str, Any], num_layers: int, where: Path) -> tuple[int, ...]:
    """The lower target layers an EAGLE-1/2 head of ours fuses (none for a published head)."""
    meta = d.get(CONFIG_KEY) or {}
    ids = (meta.get("fuse_layers") or []) if isinstance(meta, dict) else []
    if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < num_layers for i in ids) \
            or len(set(ids)) != len(ids):
        raise ModelFormatError(f"{where}: {CONFIG_KEY}.fuse_layers must list distinct target layers in "
                               f"[0, {num_layers}), got {ids!r}")
    return tuple(ids)


def _eagle3_layers(d: dict[str, Any], num_layers: int, where: Path) -> tuple[int, ...]:
    ids = (d.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    layers = tuple(int(i) for i in ids) if ids else (2, num_layers // 2, num_layers - 3)
    if len(layers) != 3 or any(not 0 <= i <= num_layers for i in layers):
        raise ModelFormatError(f"{where}: EAGLE-3 fuses three target layers in [0, {num_layers}], got {list(layers)}")
    return layers


def save_eagle_head(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write an EAGLE-1/2 head as published: config.json + model.safetensors (only the head's own
    tensors; the embedding and LM head come from the target)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    tmp = directory / "model.safetensors.tmp"
    save_file(out, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / "model.safetensors")  # never leave a half-written checkpoint behind
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory
