"""`edgespec quantize`: write a 4-bit GPTQ-compatible checkpoint (RTN or GPTQ)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model to 4-bit weights (GPTQ-compatible safetensors)",
                       description="Quantize every linear layer of a model, and the experts of BlockFFN layers, to "
                                   "4 bits (embeddings, LM head and BlockFFN routers stay fp16) and write a checkpoint "
                                   "that edgespec, transformers and GPTQ tools read.")
    p.add_argument("--model", required=True, help="a Hugging Face model directory, a .gguf file, or 'demo'")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn"],
                   help="gptq: Hessian-based error compensation on calibration text (default); rtn: round to nearest")
    p.add_argument("--group-size", type=int, default=128, help="input rows per scale (-1 = per output channel)")
    p.add_argument("--sym", action="store_true", help="symmetric weights (zero point 8) instead of asymmetric")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal (desc_act)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, a fraction of mean(diag H) (default 0.01)")
    p.add_argument("--calib", type=Path, default=None, help="GPTQ: a UTF-8 text file of calibration text")
    p.add_argument("--calib-tokens", type=int, default=2048, help="GPTQ: calibration tokens to use (default 2048)")
    p.add_argument("--seq-len", type=int, default=512, help="GPTQ: tokens per calibration sequence (default 512)")
    p.add_argument("--format", dest="checkpoint_format", default="gptq", choices=["gptq", "gptq_v2"],
                   help="zero-point convention: gptq (v1, zero - 1 stored; widest tool support) or gptq_v2")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run calibration (default cpu)")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from ..quant import QuantSettings, quantize_checkpoint  # noqa: PLC0415 - heavy imports only when used

    text = None
    if args.calib is not None:
        try:
            text = args.calib.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--calib {args.calib}: cannot read UTF-8 text ({exc})") from None
    settings = QuantSettings(method=args.method, group_size=args.group_size, sym=args.sym, act_order=args.act_order,
                             damp=args.damp, min_zero=1 if args.checkpoint_format == "gptq" else 0)
    out = quantize_checkpoint(args.model, args.out, settings, calibration_text=text,
                              calibration_tokens=args.calib_tokens, seq_len=args.seq_len,
                              checkpoint_format=args.checkpoint_format, device=args.device, progress=True)
    print(f"wrote {out}", file=sys.stderr)
    return 0
