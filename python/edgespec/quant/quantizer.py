"""edgespec's own 4-bit quantizer: round-to-nearest (RTN) and GPTQ.

GPTQ (Frantar et al., 2022) quantizes the columns (input features) of W one at a time and spreads
each column's rounding error over the columns not yet quantized, weighted by the inverse Hessian
H = 2/n X^T X of the layer's calibration inputs X. Here: the Cholesky factor of H^-1 replaces the
repeated inverse updates, errors are applied lazily per block of 128 columns, `damp` (a fraction
of mean(diag H)) keeps H positive definite, and act-order visits columns by decreasing diag(H) so
the most salient inputs are quantized while most columns are still free to absorb error.

Calibration runs through the model layer by layer ("sequential"): layer i's Hessians are measured
on the outputs of the already-quantized layers 0..i-1, and within a layer each projection group
(q|k|v, o, gate|up, down) sees its quantized predecessors.

BlockFFN layers (models/blockffn.py) quantize their experts as two linears of the block_linear
layout, up [E * d, H] and down [H, E * d]; the router stays dense (it is small and decides which
experts run). up's Hessian is that of the FFN input over all tokens; down's is that of its real
input, silu(up x) scaled by the router weights, so inactive (token, expert) pairs count as the
zeros they are. down is never act-ordered: that would interleave the experts' rows across groups,
and the kernel gathers each active expert's rows as one block.

Scales follow the GPTQ convention (asymmetric: the [min(w, 0), max(w, 0)] range on 16 levels with
an integer zero point; symmetric: zero point 8 and scale 2 max|w| / 15), rounded to fp16 before
use so the written checkpoint reproduces exactly the weights the error compensation assumed.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .. import ops
from ..ops.linear import DenseLinear
from .formats import Int4Weight

MAXQ = 15


@dataclass(frozen=True)
class QuantSettings:
    """method: 'rtn' or 'gptq'; group_size: rows per group, -1 = per-channel; sym: zero point 8;
    act_order: GPTQ column order by decreasing Hessian diagonal (desc_act); damp: GPTQ dampening
    as a fraction of mean(diag H); min_zero: smallest integer zero point (1 for the GPTQ v1
    format, which stores zero - 1 in 4 bits)."""

    method: str = "gptq"
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    damp: float = 0.01
    min_zero: int = 1

    def validate(self) -> "QuantSettings":
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"method must be 'rtn' or 'gptq', got {self.method!r}")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"group_size must be -1 (per-channel) or a positive multiple of 8, got {self.group_size}")
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.min_zero not in (0, 1):
            raise ValueError(f"min_zero must be 0 or 1, got {self.min_zero}")
        if self.act_order and self.method != "gptq":
            raise ValueError("act_order only applies to GPTQ (method='gptq')")
        return self


def qparams(w: torch.Tensor, sym: bool, min_zero: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of w: fp32 [N, g] -> (scale [N] fp32 (fp16-exact), zero [N] fp32)."""
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmax - xmin) == 0
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / MAXQ
    if sym:
        zero = torch.full_like(scale, 8.0)
    else:
        zero = torch.round(-xmin / scale)
        # A zero point below min_zero (all weights >= 0) would not fit the file format: keep the
        # top of the range representable with the smallest allowed zero instead.
        low = zero < min_zero
        scale = torch.where(low, xmax / (MAXQ - min_zero), scale)
        zero = torch.where(low, torch.full_like(zero, float(min_zero)), zero)
    scale = scale.to(torch.float16).float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # fp16 underflow: all-zero group
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Integer values (fp32, 0..15) of w [N] or [N, g] given per-row scale/zero [N]."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, MAXQ)


def _group(settings: QuantSettings, k: int) -> int:
    return k if settings.group_size == -1 else settings.group_size


def quantize_rtn(w: torch.Tensor, settings: QuantSettings) -> Int4Weight:
    """Round-to-nearest. w: fp32 [N, K] -> Int4Weight. All groups at once (one [N * G, g] pass)."""
    n, k = w.shape
    g = _group(settings, k)
    groups = -(-k // g)
    # Zero padding of a partial last group changes nothing: the range always includes 0.
    wg = torch.nn.functional.pad(w.float(), (0, groups * g - k)).reshape(n * groups, g)
    s, z = qparams(wg, settings.sym, settings.min_zero)                   # [N * G]
    q = quantize_column(wg, s, z).reshape(n, groups * g)[:, :k]          # [N, K]
    return Int4Weight(q.t().to(torch.uint8).contiguous(), s.reshape(n, groups).t().contiguous(),
                      None if settings.sym else z.reshape(n, groups).t().contiguous(), g)


def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, settings: QuantSettings, block: int = 128) -> Int4Weight:
    """GPTQ. w: fp32 [N, K]; hessian: fp32 [K, K] (2/n X^T X of the layer input) -> Int4Weight."""
    n, k = w.shape
    g = _group(settings, k)
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"quantize_gptq: Hessian is {tuple(hessian.shape)}, expected ({k}, {k}) for a weight {tuple(w.shape)}")
    W = w.float().clone()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if settings.act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += settings.damp * torch.mean(torch.diag(H)) * torch.eye(k)
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError(f"GPTQ: the Hessian ({k}x{k}) is not positive definite even with damp={settings.damp}; "
                         "use more calibration tokens or a larger --damp")
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper factor of H^-1

    if g < k:
        block = g * max(1, block // g)  # whole groups per block: group statistics see compensated weights
    Q = torch.empty(n, k)
    scales = torch.empty(-(-k // g), n)
    zeros = torch.empty_like(scales)
    if g == k:
        s, z = qparams(W, settings.sym, settings.min_zero)
        scales[0], zeros[0] = s, z
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if g < k and col % g == 0:
                s, z = qparams(W1[:, i:i + g], settings.sym, settings.min_zero)
                scales[col // g], zeros[col // g] = s, z
            s, z = scales[col // g], zeros[col // g]
            w_col = W1[:, i]
            q = quantize_column(w_col, s, z)
            Q[:, col] = q
            e = (w_col - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, i2:] -= err @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    q_kn = Q[:, inv].t().to(torch.uint8).contiguous()
    g_idx = (torch.arange(k) // g)[inv] if settings.act_order else None
    return Int4Weight(q_kn, scales, None if settings.sym else zeros, g, g_idx)


class _Stop(Exception):
    """Raised by a recorder to end a calibration forward once its input is captured."""


class HessianRecorder:
    """Stands in for a projection during calibration: accumulates H = 2/n X^T X of its inputs
    (fp32 [K, K]) and then either runs the projection or stops the forward pass."""

    def __init__(self, inner: Callable[[torch.Tensor], torch.Tensor], in_features: int, stop: bool) -> None:
        self.inner = inner
        self.in_features = in_features
        self.out_features = getattr(inner, "out_features", None)
        self.stop = stop
        self.hessian = torch.zeros(in_features, in_features)
        self.count = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        t = x2.shape[0]
        self.hessian *= self.count / (self.count + t)
        self.count += t
        x2 = x2 * (2.0 / self.count) ** 0.5
        self.hessian += x2.t() @ x2
        if self.stop:
            raise _Stop
        return self.inner(x)


def _layer_forward(decoder, i: int, residual: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """One decoder layer on the residual stream [T, H] -> [T, H] (Decoder.forward's loop body,
    with the norms written out because calibration enters and leaves between layers)."""
    cfg = decoder.config
    layer = decoder.layers[i]
    h = ops.rms_norm(residual, layer.attn_norm, cfg.rms_norm_eps)
    a = decoder._attention(i, layer, h, positions, cache, 0, None) * cfg.residual_scale
    residual = residual + a
    h = ops.rms_norm(residual, layer.ffn_norm, cfg.rms_norm_eps)
    return residual + layer.ffn(h) * cfg.residual_scale


# (attribute path on a Layer, Hugging Face projection names of its parts) in calibration order.
PROJECTIONS = (("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               ("o", ("self_attn.o_proj",)),
               ("ffn.gate_up", ("mlp.gate_proj", "mlp.up_proj")),
               ("ffn.down", ("mlp.down_proj",)))
# A BlockFFN layer's experts: tensors on the BlockFFN (block_linear layout), not linears.
BLOCKFFN_PROJECTIONS = PROJECTIONS[:2] + (("ffn.up", ("mlp.up_proj",)), ("ffn.down", ("mlp.down_proj",)))


def _is_blockffn(layer) -> bool:
    return hasattr(layer.ffn, "router_weight")


def _projections(layer) -> tuple:
    return BLOCKFFN_PROJECTIONS if _is_blockffn(layer) else PROJECTIONS


def _blockffn_input(ffn, path: str, x: torch.Tensor) -> torch.Tensor:
    """The input of a BlockFFN expert projection for FFN input x [T, H]: x itself for up, the
    router-scaled silu(up x) [T, E * d] for down (torch path, fp32 weights while calibrating)."""
    if path == "ffn.up":
        return x
    weights = ops.blockffn_router(x, ffn.router_weight, ffn.router_norm, ffn.eps)       # [T, E]
    hidden = torch.nn.functional.silu(torch.nn.functional.linear(x, ffn.up))             # [T, E * d]
    t, e = weights.shape
    return (hidden.view(t, e, -1) * weights[:, :, None]).view(t, -1)


def _get(layer, path: str):
    obj = layer
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(layer, path: str, value) -> None:
    *head, last = path.split(".")
    obj = layer
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _split_sizes(cfg, path: str) -> list[int]:
    if path == "qkv":
        return [cfg.q_size, cfg.kv_size, cfg.kv_size]
    if path == "ffn.gate_up":
        return [cfg.intermediate_size, cfg.intermediate_size]
    if path == "ffn.up":  # BlockFFN: all experts' up rows
        return [cfg.ffn["num_experts"] * cfg.ffn["expert_size"]]
    return [cfg.hidden_size]


def _dense_weight(decoder, i: int, path: str) -> torch.Tensor:
    lin = _get(decoder.layers[i], path)
    if isinstance(lin, torch.Tensor):  # a BlockFFN expert tensor [out, in]
        return lin.float()
    if not isinstance(lin, DenseLinear):
        raise ValueError(f"layer {i} {path}: only dense weights can be quantized, got {type(lin).__name__} "
                         "(is the model already quantized, or not a gated-MLP model?)")
    return lin.weight.float()


def calibration_batches(token_ids: list[int], seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    """Split calibration ids into sequences of seq_len tokens (int64 [seq_len] each), at most max_tokens in all."""
    if seq_len <= 0 or max_tokens <= 0:
        raise ValueError(f"seq_len and max_tokens must be positive, got {seq_len}, {max_tokens}")
    ids = torch.tensor(token_ids[:max_tokens], dtype=torch.int64)
    batches = [ids[s:s + seq_len] for s in range(0, ids.numel(), seq_len)]
    batches = [b for b in batches if b.numel() >= min(seq_len, 16)]
    if not batches:
        raise ValueError(f"calibration text gives {len(token_ids)} tokens; need at least {min(seq_len, 16)}")
    return batches


def quantize_decoder(decoder, settings: QuantSettings, calibration: Iterable[torch.Tensor] = (),
                     progress: bool = False) -> dict[str, Int4Weight]:
    """Quantize every projection of a dense Decoder (CPU or CUDA; fp32 recommended).

    calibration: token sequences (int64 [T] each), needed for GPTQ.
    Returns {Hugging Face prefix (model.layers.i.self_attn.q_proj, ...): Int4Weight}. The decoder
    is unchanged afterwards (it holds dequantised weights only while calibrating later layers).
    """
    settings = settings.validate()
    cfg = decoder.config
    device = decoder.device
    batches = [b.to(device) for b in calibration]
    if settings.method == "gptq" and not batches:
        raise ValueError("GPTQ needs calibration text (one or more token sequences)")
    originals = [{path: _get(layer, path) for path, _ in _projections(layer)} for layer in decoder.layers]
    result: dict[str, Int4Weight] = {}
    residuals: list[torch.Tensor] = []
    cache = None
    if batches:
        cache = decoder.new_cache(max(b.numel() for b in batches))
        with torch.no_grad():
            residuals = [ops.embedding(b, decoder.embed, cfg.embedding_scale) for b in batches]
    bar = tqdm(total=sum(len(_projections(layer)) for layer in decoder.layers),
               desc=f"quantizing ({settings.method})", disable=not progress, unit="proj")
    try:
        with torch.no_grad():
            for i, layer in enumerate(decoder.layers):
                for path, names in _projections(layer):
                    w = _dense_weight(decoder, i, path)
                    if settings.method == "gptq":
                        hessian = _calibrate(decoder, i, path, batches, residuals, cache)
                        expert_rows = _is_blockffn(layer) and path == "ffn.down"
                        quant = quantize_gptq(w.cpu(), hessian,
                                              dataclasses.replace(settings, act_order=False) if expert_rows else settings)
                    else:
                        quant = quantize_rtn(w.cpu(), settings)
                    # Later projections and layers calibrate on the quantized weights.
                    deq = quant.dequantize().to(device=device, dtype=decoder.dtype)
                    current = _get(layer, path)
                    _set(layer, path, deq if isinstance(current, torch.Tensor) else DenseLinear(deq, current.bias))
                    start = 0
                    for name, size in zip(names, _split_sizes(cfg, path)):
                        result[f"model.layers.{i}.{name}"] = quant.select_outputs(torch.arange(start, start + size))
                        start += size
                    bar.update(1)
                if batches:
                    residuals = [_layer_forward(decoder, i, r, _positions(b), cache)
                                 for b, r in zip(batches, residuals)]
    finally:
        bar.close()
        for layer, saved in zip(decoder.layers, originals):
            for path, lin in saved.items():
                _set(layer, path, lin)
    return result


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.numel(), device=tokens.device)


def _calibrate(decoder, i: int, path: str, batches: list[torch.Tensor], residuals: list[torch.Tensor],
               cache) -> torch.Tensor:
    """H of the input of projection `path` of layer i over all calibration sequences (fp32 [K, K], CPU)."""
    layer = decoder.layers[i]
    if _is_blockffn(layer) and path.startswith("ffn."):
        # The experts are tensors inside one op: record at the FFN's input instead.
        ffn = layer.ffn
        k = ffn.hidden_size if path == "ffn.up" else ffn.num_experts * ffn.expert_size
        recorder = HessianRecorder(ffn, k, stop=True)
        return _record(decoder, i, "ffn", lambda x: recorder(_blockffn_input(ffn, path, x)), recorder, batches,
                       residuals, cache)
    original = _get(layer, path)
    recorder = HessianRecorder(original, original.in_features, stop=True)
    return _record(decoder, i, path, recorder, recorder, batches, residuals, cache)


def _record(decoder, i: int, path: str, stand_in: Callable, recorder: HessianRecorder, batches: list[torch.Tensor],
            residuals: list[torch.Tensor], cache) -> torch.Tensor:
    """Run layer i on every calibration sequence with `stand_in` at `path` (which feeds `recorder`
    and stops the pass), restoring the original afterwards; returns the recorded Hessian (CPU)."""
    layer = decoder.layers[i]
    original = _get(layer, path)
    _set(layer, path, stand_in)
    try:
        for b, r in zip(batches, residuals):
            try:
                _layer_forward(decoder, i, r, _positions(b), cache)
            except _Stop:
                pass
    finally:
        _set(layer, path, original)
    return recorder.hessian.cpu()


def quantized_copy(decoder, weights: dict[str, Int4Weight], dtype: torch.dtype | None = None):
    """A Decoder sharing `decoder`'s embeddings, norms and LM head whose projections are
    QuantLinears built from `weights` (as returned by quantize_decoder), fused like the loader
    fuses them, biases kept; BlockFFN layers get a new BlockFFN with 4-bit experts (and their own
    sparsity counters). `decoder` itself is not modified."""
    dtype = dtype or decoder.dtype
    model = copy.copy(decoder)
    model.layers = []
    for i, layer in enumerate(decoder.layers):
        if _is_blockffn(layer):
            from ..models.blockffn import BlockFFN  # noqa: PLC0415 - models import the loader, which imports quant

            ffn = layer.ffn
            experts = [weights[f"model.layers.{i}.mlp.{name}"].to_linear(None, decoder.device, dtype).weight
                       for name in ("up_proj", "down_proj")]
            new = dataclasses.replace(layer, ffn=BlockFFN(ffn.router_weight, ffn.router_norm, *experts, ffn.eps))
        else:
            new = dataclasses.replace(layer, ffn=copy.copy(layer.ffn))
        for path, names in _projections(layer):
            if isinstance(_get(layer, path), torch.Tensor):
                continue  # BlockFFN experts: already in the new BlockFFN
            bias = getattr(_get(layer, path), "bias", None)
            parts = []
            start = 0
            for name, size in zip(names, _split_sizes(decoder.config, path)):
                part_bias = None if bias is None else bias[start:start + size]
                parts.append(weights[f"model.layers.{i}.{name}"].to_linear(part_bias, decoder.device, dtype))
                start += size
            _set(new, path, ops.fuse_linears(parts))
        model.layers.append(new)
    return model
