"""Draft-head training by self-distillation: the target labels its own text.

Data: local text files (split into windows) and, optionally, prompts the target answers (chat) or
continues (raw text) itself: its own greedy outputs are exactly what a draft must predict at
inference. The target runs once over every sequence; we keep its final hidden state per position
(the EAGLE feature), the top-k of its next-token distribution and, for a head that fuses lower
layers (--fuse-layers), the residual streams entering those layers.

Training (EAGLE, with the EAGLE-3 "training-time test" unroll of train_head.py): the head reads
(embed(x[t+1]), f[t]) and predicts f[t+1]; losses are a smooth-L1 regression to the target's
feature and the cross-entropy between the target's next-token distribution (its top-k,
renormalised over the draft vocabulary) and the head's, through the target's frozen LM head
restricted to the FR-Spec vocabulary when one is given (tokens outside it can never be drafted).
Embedding and LM head stay frozen and are not saved: the head is fc + one decoder layer.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.decoder import Decoder
from .eagle import save_eagle_head
from .frspec import dense_weight, load_vocab
from .train_head import TrainableEagleHead, head_config, head_model_config


@dataclass
class TrainSettings:
    """Hyper-parameters of `edgespec train-draft` (defaults sized for a 2-core CPU)."""

    steps: int = 400
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-3
    warmup: int = 20
    unroll: int = 3              # training-time-test draft steps per anchor
    fuse_layers: tuple[int, ...] = ()  # lower target layers fused into the feature (train_head.py)
    feature_weight: float = 1.0  # smooth-L1 to the target's next feature (in units of the feature RMS)
    token_weight: float = 1.0    # cross-entropy to the target's next-token distribution
    decay: float = 0.8           # loss weight ratio between successive unrolled steps
    noise: float = 0.05          # uniform noise on input features, relative to their RMS
    target_topk: int = 32        # stored target probabilities per position
    response_weight: float = 2.0  # sampling weight of self-generated chat sequences vs text windows
    checkpoint_every: int = 100
    seed: int = 0
    autocast_bf16: bool = True   # bf16 matmuls on CPUs with native bf16 (and GPUs)

    def __post_init__(self) -> None:
        self.fuse_layers = tuple(self.fuse_layers)  # compared with the cache's tuples

    def validate(self) -> "TrainSettings":
        for name in ("steps", "batch_size", "seq_len", "unroll", "target_topk", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train-draft: {name} must be >= 1, got {getattr(self, name)}")
        if len(set(self.fuse_layers)) != len(self.fuse_layers):
            raise ValueError(f"train-draft: --fuse-layers names a layer twice: {list(self.fuse_layers)}")
        if self.seq_len < self.unroll + 2:
            raise ValueError(f"train-draft: seq_len {self.seq_len} is too short for {self.unroll} unrolled steps")
        return self


@dataclass
class Sequence_:
    """One training sequence labelled by the target.

    tokens: [S] int64; feats: [S, H] target features (bf16/fp32); top_ids: [S, k] int64 and
    top_probs: [S, k] fp32, the target's most likely next tokens after each position; kind: "text",
    "chat:<prompt set>:<round>" or "val:<prompt set>" (validation only, never trained on).
    streams: [S, n*H] bf16, the residual streams entering target layers `stream_layers` (n of them,
    concatenated in that order) for a head with fused lower layers; None when not captured.
    """

    tokens: torch.Tensor
    feats: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    kind: str
    streams: torch.Tensor | None = None
    stream_layers: tuple[int, ...] = ()


def read_texts(files: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(name, text) of each file; raises FileNotFoundError naming a missing one."""
    out = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"training text {str(f)!r} not found")
        out.append((p.name, p.read_text(encoding="utf-8", errors="replace")))
    return out


@dataclass(frozen=True)
class Prompt:
    """A prompt the target answers (chat: through its chat template) or continues (chat=False: raw
    text, like `edgespec generate` without --chat), for its own outputs to train on."""

    text: str
    chat: bool = True


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a .jsonl file ({"prompt": ..., optional "chat": false for a text opening to
    continue} per line) or a text file (one chat prompt per line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} not found")
    prompts = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{i + 1}: not valid JSON ({exc})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ValueError(f"{p}:{i + 1}: expected an object with a string 'prompt'")
            if not isinstance(item.get("chat", True), bool):
                raise ValueError(f"{p}:{i + 1}: 'chat' must be true or false, got {item['chat']!r}")
            prompts.append(Prompt(item["prompt"], item.get("chat", True)))
        else:
            prompts.append(Prompt(line.strip()))
    return prompts


def text_windows(encode: Callable[[str], list[int]], texts: Sequence[tuple[str, str]], seq_len: int,
                 max_tokens: int, eos: int | None) -> list[list[int]]:
    """Token windows of seq_len from the texts, up to max_tokens in all, spread over the files."""
    per_file = max_tokens // max(len(texts), 1)
    windows: list[list[int]] = []
    for _, text in texts:
        ids: list[int] = []
        # Tokenise paragraph by paragraph: fast tokenizers slow down on megabyte strings.
        for para in text.split("\n\n"):
            if len(ids) >= per_file:
                break
            ids.extend(encode(para + "\n\n"))
        if eos is not None:
            ids.append(eos)
        ids = ids[:per_file]
        windows.extend(ids[s:s + seq_len] for s in range(0, len(ids) - seq_len // 2, seq_len))
    return [w for w in windows if len(w) >= 8]


def label(model: Decoder, ids: list[int], topk: int, kind: str, stream_layers: tuple[int, ...] = ()) -> Sequence_:
    """Run the target over `ids` and keep its features and top-k next-token probabilities (and the
    residual streams entering `stream_layers`, for a head that fuses them)."""
    t = torch.tensor(ids, dtype=torch.int64, device=model.device)
    out, streams = _target_pass(model, t, tuple(stream_layers))
    with torch.inference_mode():
        top = model.logits(out.hidden).softmax(dim=-1).topk(topk, dim=-1)   # of [S, V]
    return Sequence_(t.cpu(), out.hidden.cpu(), top.indices.cpu(), top.values.cpu(), kind, streams,
                     tuple(stream_layers))


def _target_pass(model: Decoder, tokens: torch.Tensor, layers: tuple[int, ...]):
    """The target over a whole sequence: its output and the streams entering `layers`, concatenated
    as bf16 on the CPU ([S, n*H], None without layers)."""
    with torch.inference_mode():
        out = model.forward(tokens, torch.arange(tokens.numel(), device=model.device),
                            model.new_cache(tokens.numel()), 0, capture=layers)
    streams = torch.cat([out.captured[i] for i in layers], dim=-1).to("cpu", torch.bfloat16) if layers else None
    return out, streams


def check_fuse_layers(model: Decoder, layers: tuple[int, ...]) -> None:
    """--fuse-layers must name distinct layers of the target (the streams entering them)."""
    n = model.config.num_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"train-draft: --fuse-layers {list(layers)} must be distinct layers of the target, "
                         f"0..{n - 1}")


def add_streams(model: Decoder, seqs: list[Sequence_], layers: tuple[int, ...], progress: bool = True) -> int:
    """Capture the residual streams entering `layers` for the cached sequences that lack them (one
    target pass each, tokens unchanged). Returns how many sequences were updated."""
    layers = tuple(layers)
    check_fuse_layers(model, layers)
    todo = [s for s in seqs if s.stream_layers != layers]
    for s in tqdm(todo, desc=f"capturing layers {list(layers)}", disable=not progress or not todo):
        _, s.streams = _target_pass(model, s.tokens.to(model.device), layers)
        s.stream_layers = layers
    return len(todo)


def generate_responses(llm: Any, prompts: Sequence[Prompt], max_new_tokens: int, batch: int = 16,
                       temperature: float = 0.0, seed: int = 0, progress: bool = True) -> list[list[int]]:
    """Prompt + the target's own response (chat template) or continuation (chat=False), one id list
    per prompt: greedy, or sampled at `temperature` (more distinct answers from the same prompts).

    Decodes `batch` prompts together (batch_generate): the target's own answers are what a draft
    must predict at inference, and batching makes producing hundreds of them affordable on a CPU.
    """
    from .batch_generate import generate_batch  # noqa: PLC0415

    encoded = [llm.encode(p.text, chat=p.chat) for p in prompts]
    stop = set(llm.model.config.eos_token_ids)
    if llm.tokenizer is not None:
        stop |= set(llm.tokenizer.stop_token_ids)
    gen = torch.Generator(device=llm.model.device).manual_seed(seed)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths decode together
    out: list[list[int]] = [[] for _ in encoded]
    bar = tqdm(total=len(encoded), desc=f"target responses (T={temperature})", disable=not progress)
    for s in range(0, len(order), batch):
        chunk = order[s:s + batch]
        answers = generate_batch(llm.model, [encoded[i] for i in chunk], max_new_tokens, sorted(stop),
                                 temperature=temperature, generator=gen)
        for i, ans in zip(chunk, answers):
            out[i] = encoded[i] + ans  # a stop token, when reached, is kept: the draft learns the end too
        bar.update(len(chunk))
    bar.close()
    return out


def save_sequences(path: str | Path, seqs: list[Sequence_]) -> None:
    torch.save([asdict(s) for s in seqs], str(path))


def load_sequences(path: str | Path) -> list[Sequence_]:
    seqs = [Sequence_(**d) for d in torch.load(str(path), map_location="cpu", weights_only=True)]
    for s in seqs:
        s.stream_layers = tuple(s.stream_layers)
    return seqs


class _Batcher:
    """Random padded batches (pads only at the end, so causal rows never see them)."""

    def __init__(self, seqs: list[Sequence_], settings: TrainSettings, vocab_rows: torch.Tensor | None,
                 vocab_size: int) -> None:
        self.seqs = [s for s in seqs if s.tokens.numel() >= settings.unroll + 2]
        if not self.seqs:
            raise ValueError("train-draft: no training sequence is long enough")
        w = torch.tensor([settings.response_weight if s.kind.startswith("chat") else 1.0 for s in self.seqs])
        self.weights = w / w.sum()
        self.settings = settings
        # Target id -> row of the draft vocabulary (-1: not draftable).
        self.row_of = torch.full((vocab_size,), -1, dtype=torch.int64)
        if vocab_rows is None:
            self.row_of = torch.arange(vocab_size)
        else:
            self.row_of[vocab_rows] = torch.arange(vocab_rows.numel())
        self.gen = torch.Generator().manual_seed(settings.seed)

    def sample(self) -> dict[str, torch.Tensor]:
        s = self.settings
        idx = torch.multinomial(self.weights, s.batch_size, replacement=True, generator=self.gen).tolist()
        parts = []
        for i in idx:
            seq = self.seqs[i]
            n = seq.tokens.numel()
            start = 0 if n <= s.seq_len else int(torch.randint(0, n - s.seq_len + 1, (1,), generator=self.gen))
            parts.append((seq, start, min(n, s.seq_len)))
        return self.pad(parts)

    def pad(self, parts: list[tuple[Sequence_, int, int]]) -> dict[str, torch.Tensor]:
        """A padded batch of (sequence, start, length) slices."""
        length = max(p[2] for p in parts)
        b = len(parts)
        h = parts[0][0].feats.shape[1]
        k = parts[0][0].top_ids.shape[1]
        tokens = torch.zeros(b, length, dtype=torch.int64)
        feats = torch.zeros(b, length, h)
        top_rows = torch.full((b, length, k), -1, dtype=torch.int64)
        top_probs = torch.zeros(b, length, k)
        mask = torch.zeros(b, length)
        layers = self.settings.fuse_layers
        streams = torch.zeros(b, length, len(layers) * h) if layers else None
        for r, (seq, start, n) in enumerate(parts):
            sl = slice(start, start + n)
            tokens[r, :n] = seq.tokens[sl]
            feats[r, :n] = seq.feats[sl].float()
            top_rows[r, :n] = self.row_of[seq.top_ids[sl]]
            top_probs[r, :n] = seq.top_probs[sl].float()
            mask[r, :n] = 1.0
            if streams is not None:
                if seq.stream_layers != layers:
                    raise ValueError(f"train-draft: a {seq.kind} sequence holds the streams of layers "
                                     f"{list(seq.stream_layers)}, not of --fuse-layers {list(layers)}")
                streams[r, :n] = seq.streams[sl].float()
        top_probs = top_probs * (top_rows >= 0)
        top_probs = top_probs / top_probs.sum(-1, keepdim=True).clamp_min(1e-9)
        return {"tokens": tokens, "feats": feats, "top_rows": top_rows.clamp_min(0), "top_probs": top_probs,
                "mask": mask, "streams": streams}


def evaluate(head: TrainableEagleHead, embed: torch.Tensor, lm_w: torch.Tensor, lm_b: torch.Tensor | None,
             batcher: _Batcher, seqs: list[Sequence_], settings: TrainSettings) -> dict[str, float]:
    """Per-depth top-1 agreement of the head with the target over every position of `seqs`
    (no input noise, whole sequences in windows of seq_len): {"val_acc1": ..., "val_acc2": ...}.
    Depth j drafts f[t+j] from the real pair at t and j - 1 of its own predictions, as a chain.
    When `seqs` hold several sets (kinds "val:<set>"), each set's depth-1 agreement is added as
    "val_acc1_<set>": the pooled number weighs the sets by their token counts."""
    clean = dataclasses.replace(settings, noise=0.0)
    hits: dict[str, list[float]] = {}
    counts: dict[str, list[float]] = {}
    was_training = head.training
    head.eval()
    with torch.no_grad():
        for kind in sorted({seq.kind for seq in seqs}):
            parts = [(seq, st, min(settings.seq_len, seq.tokens.numel() - st)) for seq in seqs if seq.kind == kind
                     for st in range(0, max(seq.tokens.numel() - settings.unroll - 1, 1), settings.seq_len)]
            hits[kind], counts[kind] = [0.0] * settings.unroll, [0.0] * settings.unroll
            for i in range(0, len(parts), settings.batch_size):
                batch = batcher.pad(parts[i:i + settings.batch_size])
                _, stats = _loss(head, embed, lm_w, lm_b, batch, clean, counts_out=True)
                for j in range(settings.unroll):
                    hits[kind][j] += stats[f"hits{j + 1}"]
                    counts[kind][j] += stats[f"count{j + 1}"]
    head.train(was_training)

    def acc(kinds: list[str], j: int) -> float:
        return round(sum(hits[k][j] for k in kinds) / max(sum(counts[k][j] for k in kinds), 1.0), 4)

    out = {f"val_acc{j + 1}": acc(list(hits), j) for j in range(settings.unroll)}
    if len(hits) > 1:
        out.update({f"val_acc1_{k.removeprefix('val:')}": acc([k], 0) for k in hits})
    return out


def _frozen_target_parts(target: Decoder, frspec_vocab: str | Path | None):
    """The target's embedding [V, H] and LM head [V', H] (+ bias) as fp32 CPU tensors, the LM head
    restricted to the FR-Spec vocabulary when one is given (its ids are returned too, or None)."""
    cfg = target.config
    embed = target.embed.detach().float().cpu()
    lm_w, lm_b = dense_weight(target.lm_head)
    vocab_rows = None
    if frspec_vocab is not None:
        vocab_rows = load_vocab(frspec_vocab, cfg.vocab_size)
        lm_w = lm_w[vocab_rows.to(lm_w.device)]
        lm_b = None if lm_b is None else lm_b[vocab_rows.to(lm_b.device)]
    lm_w = lm_w.detach().float().cpu() * cfg.logit_scale
    lm_b = None if lm_b is None else lm_b.detach().float().cpu()
    return embed, lm_w, lm_b, vocab_rows


def evaluate_head(target: Decoder, seqs: list[Sequence_], settings: TrainSettings, head: str | Path | None = None,
                  frspec_vocab: str | Path | None = None) -> dict[str, float]:
    """`evaluate` for a head directory (None: a freshly initialised head) on labelled sequences,
    over the FR-Spec vocabulary given (the head's own frspec.json is not implied)."""
    model = TrainableEagleHead(head_model_config(target.config), fuse_layers=settings.fuse_layers)
    model.reset_parameters(settings.seed)
    if head is not None:
        _load_init(model, Path(head))
    embed, lm_w, lm_b, vocab_rows = _frozen_target_parts(target, frspec_vocab)
    batcher = _Batcher(seqs, settings, vocab_rows, target.config.vocab_size)
    return evaluate(model, embed, lm_w, lm_b, batcher, seqs, settings)


def train_head(target: Decoder, seqs: list[Sequence_], settings: TrainSettings, out_dir: str | Path,
               frspec_vocab: str | Path | None = None, init: str | Path | None = None,
               meta: dict[str, Any] | None = None, progress: bool = True,
               val_seqs: list[Sequence_] | None = None) -> dict[str, Any]:
    """Train an EAGLE-1/2 head for `target` on labelled sequences and write it to out_dir
    (config.json + model.safetensors, bf16, every checkpoint_every steps and at the end).
    val_seqs: held-out sequences scored by `evaluate` at every checkpoint (metrics val_acc*, and
    the history under "validation" in config.json). Returns the final metrics."""
    settings.validate()
    out_dir = Path(out_dir)
    cfg = target.config
    torch.manual_seed(settings.seed)
    check_fuse_layers(target, settings.fuse_layers)
    head = TrainableEagleHead(head_model_config(cfg), fuse_layers=settings.fuse_layers)
    head.reset_parameters(settings.seed)
    if init is not None:
        _load_init(head, Path(init))
    embed, lm_w, lm_b, vocab_rows = _frozen_target_parts(target, frspec_vocab)  # [V, H], [V', H]: frozen
    batcher = _Batcher(seqs, settings, vocab_rows, cfg.vocab_size)
    opt = torch.optim.AdamW(head.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return settings.lr * (step + 1) / settings.warmup
        frac = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    meta = dict(meta or {})
    if settings.fuse_layers:
        meta["fuse_layers"] = list(settings.fuse_layers)
    if frspec_vocab is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(frspec_vocab, out_dir / "frspec.json")
        meta["frspec_vocab"] = "frspec.json"
    use_bf16 = settings.autocast_bf16 and _bf16_ok()
    metrics: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    bar = tqdm(range(settings.steps), desc="train-draft", disable=not progress)
    t0 = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = batcher.sample()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss, stats = _loss(head, embed, lm_w, lm_b, batch, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        metrics = {"step": step + 1, "loss": round(float(loss.detach()), 4), **stats}
        bar.set_postfix({k: v for k, v in metrics.items() if k != "step"})
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            if val_seqs:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    metrics.update(evaluate(head, embed, lm_w, lm_b, batcher, val_seqs, settings))
                history.append({k: v for k, v in metrics.items() if k == "step" or k.startswith("val_")})
                bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v}" for k, v in history[-1].items() if k != "step"))
            info = {**meta, "train_settings": asdict(settings), "metrics": metrics,
                    "train_seconds": round(time.time() - t0, 1)}
            if history:
                info["validation"] = history
            save_eagle_head(out_dir, head.eagle_tensors(), head_config(cfg, **info))
    return metrics


def _loss(head: TrainableEagleHead, embed: torch.Tensor, lm_w: torch.Tensor, lm_b: torch.Tensor | None,
          batch: dict[str, torch.Tensor], s: TrainSettings,
          counts_out: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    tokens, feats, mask = batch["tokens"], batch["feats"], batch["mask"]
    emb = embed[tokens[:, 1:]]                                                   # [B, L-1, H]: x[t+1]
    inputs = feats[:, :-1]                                                       # [B, L-1, H]: f[t]
    if s.noise > 0:
        rms = inputs.pow(2).mean(-1, keepdim=True).sqrt()
        inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * s.noise * rms
    if batch["streams"] is not None:
        inputs = head.fuse(inputs, batch["streams"][:, :-1])
    outs = head.unrolled(emb, inputs, s.unroll)
    # The regression is measured in units of the features' RMS, so its weight means the same for
    # every target (SmolLM2's final features are in the tens).
    scale = (feats.pow(2).mean(-1).sum() / mask.sum().clamp_min(1.0)).sqrt().clamp_min(1e-6)
    total = torch.zeros(())
    stats: dict[str, float] = {}
    for j, out in enumerate(outs, 1):
        n = out.shape[1]
        tgt = feats[:, j:j + n]                                                  # f[t+j]
        m = mask[:, j:j + n]
        denom = m.sum().clamp_min(1.0)
        loss_v = (F.smooth_l1_loss(out.float() / scale, tgt / scale, reduction="none").mean(-1) * m).sum() / denom
        logits = F.linear(out, lm_w, lm_b).float()                              # [B, n, V']
        logp = logits.log_softmax(-1)
        rows, probs = batch["top_rows"][:, j:j + n], batch["top_probs"][:, j:j + n]
        loss_p = (-(probs * logp.gather(-1, rows)).sum(-1) * m).sum() / denom
        hit = (logits.argmax(-1) == rows[..., 0]).float()
        weight = s.decay ** (j - 1)
        total = total + weight * (s.feature_weight * loss_v + s.token_weight * loss_p)
        stats[f"acc{j}"] = round(float((hit * m).sum() / denom), 3)
        if counts_out:  # raw sums, for averaging over many batches
            stats[f"hits{j}"] = float((hit * m).sum())
            stats[f"count{j}"] = float(m.sum())
    return total, stats


def _bf16_ok() -> bool:
    from ..loading import default_dtype  # noqa: PLC0415

    return default_dtype(torch.device("cpu")) == torch.bfloat16


def _load_init(head: TrainableEagleHead, directory: Path) -> None:
    """Start from an existing EAGLE-1/2 head with the same shapes (resume or refine). A head without
    fused layers can start one with them (the fusion starts as a no-op); the reverse is an error."""
    from ..errors import ModelFormatError  # noqa: PLC0415
    from ..loading.hf_dir import HFDirectorySource, read_json  # noqa: PLC0415
    from .eagle import CONFIG_KEY  # noqa: PLC0415

    src = HFDirectorySource(directory)
    meta = read_json(directory / "config.json").get(CONFIG_KEY) or {}
    init_layers = tuple(meta.get("fuse_layers") or ())
    if init_layers and init_layers != head.fuse_layers:
        raise ModelFormatError(f"{directory}: --init head fuses target layers {list(init_layers)}, but this run "
                               f"fuses {list(head.fuse_layers)} (--fuse-layers)")
    params = head.eagle_tensors()
    with torch.no_grad():
        for name, p in params.items():
            if name.startswith("fuse.") and not init_layers:
                continue  # keep the no-op fusion of reset_parameters
            if not src.has(name):
                raise ModelFormatError(f"{directory}: --init head lacks {name}")
            t = src.tensor(name)
            if t.shape != p.shape:
                raise ModelFormatError(f"{directory}: --init tensor {name} has shape {tuple(t.shape)}, "
                                       f"expected {tuple(p.shape)}")
            p.copy_(t.float())
