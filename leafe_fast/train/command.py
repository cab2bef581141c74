"""``leafe-fast train``: Stage-2 experience distillation on packed samples.

    leafe-fast train --samples samples.npz --model tiny --out runs/tiny --max-steps 20     # CPU, seconds
    leafe-fast train --samples samples.npz --model /models/Qwen2.5-1.5B --out runs/q15 \\
        --epochs 2 --token-budget 16384 --grad-accum 4 --lr 1e-5 --activation-checkpointing  # one GPU
    torchrun --nproc-per-node 8 -m leafe_fast.cli train ...                                 # FSDP2

Every training flag comes from a field of :class:`leafe_fast.train.config.TrainConfig` (its parts:
optimizer, data/packing, loss, compute, checkpoint), so the defaults and help live there once; a
``--config FILE`` JSON object of the same (nested) fields is read first, flags override it.

Writes ``<out>/metrics.jsonl``, ``<out>/checkpoints/step_*`` (with --save-every), ``<out>/summary.json``
and the trained model as safetensors in ``<out>/final`` (``--no-export`` skips it; loadable by
``AutoModelForCausalLM.from_pretrained``). ``--resume`` continues from the latest checkpoint in ``<out>``
exactly where it stopped (and refuses changed data settings).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from leafe_fast.checks import check_device, check_model_dir, check_out_path, run_folder_lock
from leafe_fast.errors import UserError
from leafe_fast.flags import add_config_flags, config_from_args, config_from_file
from leafe_fast.outputs import write_json
from leafe_fast.train.config import DTYPE_CHOICES, TrainConfig, part_classes

# Loss options the trainer fixes itself (it always sums with its own normalisers, checks ranges once per
# epoch on the host, and takes G from lambdas), and the run directory (the --out flag).
NOT_FLAGS = ("reduction", "num_groups", "check_ranges", "output_dir")


@dataclass
class ModelLoadConfig:
    """How ``--model`` is loaded for training (see :func:`leafe_fast.train.model.load_model`)."""

    tiny_style: str = field(default="qwen2", metadata={
        "help": "architecture and chat template of --model tiny", "choices": ("qwen2", "llama3")})
    dtype: str = field(default="auto", metadata={
        "help": "parameter dtype at load (auto: from --precision; a mismatch is cast by the trainer)",
        "choices": DTYPE_CHOICES})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (none: cuda when available)"})
    attn: str = field(default="auto", metadata={
        "help": "attention backend", "choices": ("auto", "flash_attn", "torch_varlen", "sdpa_mask", "loop")})
    liger: str = field(default="auto", metadata={
        "help": "Liger RMSNorm and SwiGLU kernels (auto: on CUDA when installed)", "choices": ("auto", "on", "off")})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=Path, required=True, help="samples .npz written by `leafe-fast build-data`")
    p.add_argument("--model", required=True,
                   help="local model directory (config.json + weights), or 'tiny' for a random tiny model")
    p.add_argument("--out", type=Path, required=True, help="run directory: metrics.jsonl, checkpoints/, final/")
    p.add_argument("--config", type=Path, default=None,
                   help="JSON object of TrainConfig fields ({\"optim\": {\"lr\": ...}, \"data\": {...}, ...}); "
                        "flags override it")
    add_config_flags(p.add_argument_group("model"), ModelLoadConfig)
    parts = part_classes()
    add_config_flags(p.add_argument_group("run"), TrainConfig, exclude=NOT_FLAGS + tuple(parts))
    for name, cls in parts.items():  # one --help section per part
        add_config_flags(p.add_argument_group(f"{name} ({cls.__name__})"), cls, exclude=NOT_FLAGS)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's ``TrainConfig``: defaults, then ``--config``, then the flags; ``--out`` is the run directory."""
    base = config_from_file(TrainConfig, args.config) if args.config is not None else None
    cfg = config_from_args(TrainConfig, args, base, exclude=NOT_FLAGS)
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, output_dir=str(args.out)))


def _model_and_tokenizer(mc: ModelLoadConfig, model: str, precision: str, seed: int, device):
    from leafe_fast.train.model import load_model

    liger = {"auto": "auto", "on": True, "off": False}[mc.liger]
    if model == "tiny":
        from leafe_fast.tiny import tiny_config, tiny_tokenizer

        tok = tiny_tokenizer(mc.tiny_style)
        cfg = tiny_config(tok, "qwen2" if mc.tiny_style == "qwen2" else "llama")
        net = load_model(cfg, dtype=mc.dtype, precision=precision, device=device, attn=mc.attn, liger=liger,
                         seed=seed)
        return net, tok
    if not os.path.isdir(model):
        raise UserError(f"--model {model}", "is not a local directory and not 'tiny'",
                        "pass a directory with config.json and weights")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise UserError(f"--model {model}", "has no config.json", "pass a model directory saved by transformers")
    net = load_model(model, dtype=mc.dtype, precision=precision, device=device, attn=mc.attn, liger=liger)
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError):  # a weights-only directory: export without a tokenizer
        tok = None
    return net, tok


def _check_compute(cfg: TrainConfig, mc: ModelLoadConfig, device) -> None:
    """Options that need CUDA, checked before the model loads (else a traceback from deep inside)."""
    if device.type == "cuda":
        return
    triton_impl = str(cfg.loss.impl).startswith("triton") or cfg.loss.impl == "chunked"  # chunked: a Triton row kernel
    if triton_impl and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(f"--impl {cfg.loss.impl}", f"the Triton kernels need CUDA, and this run is on {device.type}",
                        "pass --impl auto (or torch) on the CPU")
    if mc.liger == "on":
        raise UserError("--liger on", f"Liger's Triton kernels need CUDA, and this run is on {device.type}",
                        "pass --liger auto (or off) on the CPU")


def _check_attention(cfg: TrainConfig, mc: ModelLoadConfig, samples, device) -> None:
    """An explicit ``--attn`` is used as asked or refused, never swapped for another backend mid-run: it must
    run on this device, take this run's compute dtype, and be reached at all (trie batches use the tree
    backends)."""
    if mc.attn == "auto":
        return
    from leafe_fast.packing import resolve_layout
    from leafe_fast.train.attention import available_backends
    from leafe_fast.train.precision import resolve_precision

    avail = available_backends(device)
    where = f"--attn {mc.attn}"
    if mc.attn not in avail:
        need = {"flash_attn": "CUDA and the flash-attn package", "torch_varlen": "CUDA and torch >= 2.10"}
        raise UserError(where, f"is not available on {device.type} here (it needs {need.get(mc.attn, 'CUDA')}); "
                        f"available: {', '.join(avail)}", f"pass --attn auto (or one of {', '.join(avail)})")
    precision = resolve_precision(cfg.compute.precision, device)
    if mc.attn in ("flash_attn", "torch_varlen") and precision == "fp32":
        raise UserError(where, "the flash kernels take bf16/fp16 inputs only, and this run computes in fp32 "
                        f"(--precision {cfg.compute.precision})",
                        "pass --precision bf16-mixed, or --attn sdpa_mask, loop or auto")
    if resolve_layout(cfg.data.layout, samples.tree_id) == "trie":
        raise UserError(where, "sets the attention of flat micro-batches, and these samples pack as prefix tries "
                        f"(--layout {cfg.data.layout}{': they carry tree ids' if cfg.data.layout == 'auto' else ''}"
                        "), whose attention is the tree backend", "pass --layout flat to use it, or --attn auto")


def run(args: argparse.Namespace) -> int:
    from leafe_fast.data.columns import SampleColumns
    from leafe_fast.train.distributed import cleanup, init_distributed
    from leafe_fast.train.trainer import Trainer

    cfg = train_config(args)  # config mistakes first: before any file or model is loaded
    mc = config_from_args(ModelLoadConfig, args)
    if not args.samples.is_file():
        raise UserError(f"--samples {args.samples}", "does not exist or is not a file",
                        "pass the .npz written by `leafe-fast build-data`")
    samples = SampleColumns.load(args.samples)
    if len(samples) == 0:
        raise UserError(f"--samples {args.samples}", "holds no samples", "rebuild it with `leafe-fast build-data`")
    check_out_path(args.out, folder=True)
    check_device(mc.device)
    if args.model != "tiny" and os.path.isdir(args.model) and os.path.isfile(os.path.join(args.model, "config.json")):
        check_model_dir(args.model, tokenizer=False)  # weights and a readable config, before loading
    if cfg.compute.fsdp is True and "RANK" not in os.environ:
        raise UserError("--fsdp true", "needs a process group, and this process was not started by torchrun",
                        "launch with `torchrun --nproc-per-node N $(which leafe-fast) train ...`, or pass --fsdp auto")
    dist_info = init_distributed(mc.device)
    _check_compute(cfg, mc, dist_info.device)
    _check_attention(cfg, mc, samples, dist_info.device)
    # one run per --out at a time (rank 0 holds the lock): a second one would interleave checkpoints and metrics
    with run_folder_lock(args.out) if dist_info.is_main else contextlib.nullcontext():
        model, tok = _model_and_tokenizer(mc, args.model, cfg.compute.precision, cfg.data.seed, dist_info.device)
        trainer = Trainer(model, samples, cfg, tokenizer=tok, dist_info=dist_info, samples_path=args.samples)
        summary = trainer.train()
        if dist_info.is_main:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            record = {k: v for k, v in summary.__dict__.items() if k != "losses"}
            write_json(out / "summary.json", record, default=float,
                       disk_full_fix="free disk space; the trained model and checkpoints are written")
            if not cfg.progress:  # with progress on, Trainer.train has printed the summary line already
                print(summary.to_text())
            if summary.export:
                print(f"train: model written to {summary.export}")
    cleanup()
    return 0

