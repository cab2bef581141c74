"""``leafe-fast train``: Stage-2 experience distillation on packed samples.

    leafe-fast train --samples samples.npz --model tiny --out runs/tiny --steps 20        # CPU, seconds
    leafe-fast train --samples samples.npz --model /models/Qwen2.5-1.5B --out runs/q15 \\
        --epochs 2 --budget 16384 --grad-accum 4 --lr 1e-5 --activation-checkpointing    # one GPU, bf16-mixed
    torchrun --nproc-per-node 8 -m leafe_fast.cli train ...                             # FSDP2

Writes ``<out>/metrics.jsonl``, ``<out>/checkpoints/step_*`` (with --save-every) and the trained model as
safetensors in ``<out>/final`` (loadable by ``AutoModelForCausalLM.from_pretrained``). ``--resume``
continues from the latest checkpoint in ``<out>`` exactly where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help="samples .npz written by `leafe-fast build-data`")
    p.add_argument("--model", required=True,
                   help="local model directory (config.json + weights), or 'tiny' for a random tiny model")
    p.add_argument("--tiny-family", default="qwen2", choices=["qwen2", "llama"],
                   help="architecture of --model tiny (its tokenizer has this family's chat template)")
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints/, final/")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the samples when --steps is not set")
    p.add_argument("--budget", type=int, default=4096, help="tokens per packed micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step per rank")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices only)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 disables)")
    p.add_argument("--lambdas", type=float, nargs=2, default=(1.0, 1.0), metavar=("REHEARSAL", "COUNTERFACTUAL"),
                   help="loss multipliers of the two groups")
    p.add_argument("--norm-mode", default="count", choices=["count", "weight"],
                   help="normalize each group by its target count or by its summed sample weights")
    p.add_argument("--z-loss", type=float, default=0.0, help="z-loss coefficient (0: off)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16-mixed", "bf16-pure", "fp32"],
                   help="bf16-mixed: fp32 master weights and AdamW state, bf16 compute (the CUDA default); "
                        "bf16-pure: bf16 weights updated directly (less memory, small updates are lost); "
                        "fp32 (the CPU default)")
    p.add_argument("--dtype", default="auto",
                   help="parameter dtype at load (auto: from --precision; a mismatch is cast by the trainer)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--attn", default="auto",
                   help="attention: auto, flash_attn, torch_varlen, sdpa_mask or loop")
    p.add_argument("--liger", default="auto", choices=["auto", "on", "off"],
                   help="Liger RMSNorm/RoPE/SwiGLU kernels (auto: on CUDA when installed)")
    p.add_argument("--seed", type=int, default=0, help="seed of model init (tiny), packing and data order")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-export", action="store_true", help="do not write safetensors to <out>/final")
    p.add_argument("--log-every", type=int, default=1, help="steps between metrics.jsonl records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_and_tokenizer(args, device):
    from leafe_fast.train.model import load_model

    liger = {"auto": "auto", "on": True, "off": False}[args.liger]
    if args.model == "tiny":
        from leafe_fast.tiny import tiny_config, tiny_tokenizer

        tok = tiny_tokenizer("qwen2" if args.tiny_family == "qwen2" else "llama3")
        cfg = tiny_config(tok, args.tiny_family)
        model = load_model(cfg, dtype=args.dtype, precision=args.precision, device=device, attn=args.attn,
                           liger=liger, seed=args.seed)
        return model, tok
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model!r}: not a local directory and not 'tiny'")
    model = load_model(args.model, dtype=args.dtype, precision=args.precision, device=device, attn=args.attn,
                       liger=liger)
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
    except Exception:  # a weights-only directory: export without a tokenizer
        tok = None
    return model, tok


def run(args: argparse.Namespace) -> int:
    from leafe_fast.data.columns import SampleColumns
    from leafe_fast.train.distributed import init_distributed
    from leafe_fast.train.trainer import TrainConfig, Trainer

    if not Path(args.samples).exists():
        print(f"leafe-fast train: --samples {args.samples} does not exist", file=sys.stderr)
        return 2
    samples = SampleColumns.load(args.samples)
    if len(samples) == 0:
        print(f"leafe-fast train: {args.samples} holds no samples", file=sys.stderr)
        return 2
    dist_info = init_distributed(args.device)
    model, tok = _model_and_tokenizer(args, dist_info.device)
    cfg = TrainConfig(
        output_dir=args.out, max_steps=args.steps, epochs=args.epochs, token_budget=args.budget,
        grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, lambdas=tuple(args.lambdas), norm_mode=args.norm_mode,
        z_loss=args.z_loss, activation_checkpointing=args.activation_checkpointing, seed=args.seed,
        save_every=args.save_every, resume=args.resume, export=not args.no_export, log_every=args.log_every,
        progress=not args.no_progress, precision=args.precision,
    )
    try:
        trainer = Trainer(model, samples, cfg, tokenizer=tok, dist_info=dist_info)
    except ValueError as exc:  # bad samples for this model (vocabulary, groups, nothing to pack): say which
        print(f"leafe-fast train: {exc}", file=sys.stderr)
        return 2
    summary = trainer.train()
    if dist_info.is_main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        record = {k: v for k, v in summary.__dict__.items() if k != "losses"}
        (Path(args.out) / "summary.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
        if args.no_progress:  # with the bar on, the trainer has printed the summary already
            print(summary.to_text())
        if summary.export:
            print(f"train: model written to {summary.export}")
    from leafe_fast.train.distributed import cleanup

    cleanup()
    return 0
