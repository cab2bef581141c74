"""Stage-2 trainer: packed varlen micro-batches, fused LEAFE loss, AdamW, FSDP2, exact resume.

One optimizer step = ``grad_accum`` packed micro-batches per rank. Before the step, the per-group
normalizers (number, or weight sum, of rehearsal and counterfactual targets) are summed over all of
the step's micro-batches and all ranks (``leafe_fast.loss.group_norms``), and every micro-batch's loss
is divided by them, so the accumulated gradient equals the gradient of one big batch, whatever the
packing, accumulation or number of ranks.

Run on one device with ``Trainer(model, samples, TrainConfig(...)).train()``; under ``torchrun`` the
same code shards the model with FSDP2 (see :mod:`leafe_fast.train.distributed`). On CUDA the default
precision is bf16-mixed: fp32 master weights and AdamW state, bf16 compute
(see :mod:`leafe_fast.train.precision`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from leafe_fast.train.checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from leafe_fast.train.distributed import DistInfo, all_reduce_sum, apply_fsdp, init_distributed
from leafe_fast.train.precision import PRECISIONS, autocast_dtype, cast_to_master, resolve_precision
from leafe_fast.train.metrics import (
    MetricsLog,
    Throughput,
    flops_per_token,
    measure_matmul_flops,
    memory_stats,
    peak_flops_from_table,
)
from leafe_fast.train.model import (
    LeafeCausalLM,
    as_batch,
    base_model,
    count_parameters,
    enable_activation_checkpointing,
)

GROUP_NAMES = ("rehearsal", "counterfactual")


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model and the samples."""

    output_dir: str | None = None  # metrics.jsonl, checkpoints/, final/ (None: keep nothing on disk)
    max_steps: int | None = None  # optimizer steps; None: run ``epochs`` over the data
    epochs: float = 1.0
    token_budget: int = 4096  # tokens per packed micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step per rank
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # None or 0 disables clipping
    lambdas: tuple[float, ...] = (1.0, 1.0)  # rehearsal, counterfactual loss multipliers
    norm_mode: str = "count"  # normalize each group by its "count" of targets or "weight" sum
    z_loss: float = 0.0
    activation_checkpointing: bool = False
    pack_strategy: str = "auto"  # "bfd" | "balanced" | "auto" (balanced when several ranks)
    truncation: str = "error"  # what the packer does with a sample longer than token_budget
    seed: int = 0
    log_every: int = 1
    save_every: int | None = None  # checkpoint every n steps (and at the end when output_dir is set)
    keep_last: int = 2
    resume: bool | str = False  # True: latest checkpoint under output_dir; str: that checkpoint
    export: bool = False  # write safetensors to output_dir/final at the end
    fsdp: bool | str = "auto"  # "auto": FSDP2 when more than one rank
    # "bf16-mixed" (fp32 master weights + AdamW state, bf16 compute), "bf16-pure" (bf16 weights updated
    # directly: less memory, small updates rounded away), "fp32"; "auto": bf16-mixed on CUDA, fp32 on CPU.
    # See leafe_fast.train.precision.
    precision: str = "auto"
    peak_flops: float | str | None = "auto"  # MFU denominator; "auto": table on CUDA, measured on CPU
    progress: bool = True

    def __post_init__(self) -> None:
        if self.token_budget <= 0 or self.grad_accum <= 0:
            raise ValueError("TrainConfig: token_budget and grad_accum must be positive")
        if self.norm_mode not in ("count", "weight"):
            raise ValueError(f"TrainConfig: norm_mode must be 'count' or 'weight', got {self.norm_mode!r}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"TrainConfig: max_steps must be positive, got {self.max_steps}")
        if self.epochs <= 0:
            raise ValueError(f"TrainConfig: epochs must be positive, got {self.epochs}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig: precision must be one of {PRECISIONS}, got {self.precision!r}")
        self.betas = tuple(self.betas)
        self.lambdas = tuple(float(x) for x in self.lambdas)


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    target_tokens: int
    seconds: float
    tokens_per_s: float
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    group_losses: dict[str, float] = field(default_factory=dict)
    mfu: float | None = None
    memory: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    export: str | None = None
    precision: str | None = None

    def to_text(self) -> str:
        parts = [f"{self.steps} steps", f"{self.tokens:,} tokens ({self.target_tokens:,} targets)",
                 *([self.precision] if self.precision else []),
                 f"{self.seconds:.1f} s", f"{self.tokens_per_s:,.0f} tok/s"]
        if self.mfu is not None:
            parts.append(f"MFU {100 * self.mfu:.1f}%")
        if self.final_loss is not None:
            parts.append(f"final loss {self.final_loss:.4f}")
        parts += [f"{k} CE {v:.4f}" for k, v in self.group_losses.items()]
        return "train: " + ", ".join(parts)


class Trainer:
    """Trains a causal LM (from :func:`leafe_fast.train.load_model`) on LEAFE samples.

    samples: ``SampleColumns`` or a list of ``Sample``. The packing is recomputed per epoch with seed
    ``seed + epoch`` (deterministic), so the data position saved in a checkpoint is just
    (epoch, micro-batch index).
    """

    def __init__(
        self,
        model: nn.Module,
        samples: Any,
        config: TrainConfig | None = None,
        *,
        tokenizer: Any = None,
        dist_info: DistInfo | None = None,
    ):
        self.config = cfg = config or TrainConfig()
        self.hf_model = model
        self.tokenizer = tokenizer
        self.samples = samples
        self.device = next(model.parameters()).device
        self.dist = dist_info or init_distributed(self.device)
        self.num_groups = len(cfg.lambdas)
        self.out = Path(cfg.output_dir) if cfg.output_dir else None

        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        use_fsdp = self.dist.distributed if cfg.fsdp == "auto" else bool(cfg.fsdp)
        self.fsdp = use_fsdp
        if self.dist.distributed and not use_fsdp:
            raise ValueError("Trainer: several ranks need FSDP2 (fsdp=True or 'auto'); nothing else syncs gradients")
        # Resolved once ("auto" -> device default) and saved in train_state: a resume must use the same.
        self.precision = resolve_precision(cfg.precision, self.device)
        cast_to_master(model, self.precision)  # before sharding and before the optimizer sees the params
        bf16_compute = autocast_dtype(self.precision)
        # One process: autocast in the wrapper. FSDP2: its mixed-precision policy gathers bf16 copies of the
        # fp32 shards instead, so the wrapper must not autocast on top of it.
        # Ranges are checked once per epoch on the host (_check_ranges), not by a device sync per micro-batch.
        self.wrapper = LeafeCausalLM(model, cfg.lambdas, cfg.z_loss, autocast_dtype=None if use_fsdp else bf16_compute,
                                     check_ranges=False)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.num_params = count_parameters(model)
        self.loss_scale = 1.0
        if use_fsdp:
            summed = apply_fsdp(self.wrapper, base_model(model).layers, param_dtype=bf16_compute,
                                reduce_dtype=torch.float32)
            if not summed:
                self.loss_scale = float(self.dist.world_size)
        fused = self.device.type == "cuda"
        decay, no_decay = [], []
        for name, p in self.wrapper.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused,
        )
        self.epoch_batches: list[Any] = []
        self.epoch_loaded = -1
        self.steps_per_epoch = math.ceil(len(self._micro_batches(0)) / cfg.grad_accum)
        if self.steps_per_epoch == 0:
            raise ValueError("Trainer: the samples produced no micro-batches (no samples?)")
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, cfg.warmup_steps, self.total_steps)
        self.step = 0
        self.epoch = 0
        self.cursor = 0  # index of the next micro-batch in this epoch (this rank's list)
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []
        self._saved_step = -1
        self.peak_flops = self._resolve_peak_flops(cfg.peak_flops)
        if cfg.resume and not self.resume(cfg.resume) and self.dist.is_main:
            warnings.warn(f"Trainer: resume requested but {self.out / 'checkpoints'} holds no checkpoint; "
                          "starting from step 0", stacklevel=2)

    # ------------------------------------------------------------------------------------------ data
    def _micro_batches(self, epoch: int) -> list[Any]:
        """This rank's micro-batches of ``epoch``, in a seeded shuffled order (cached per epoch)."""
        if epoch == self.epoch_loaded:
            return self.epoch_batches
        from leafe_fast.packing import pack

        cfg = self.config
        strategy = cfg.pack_strategy
        if strategy == "auto":
            strategy = "balanced" if self.dist.world_size > 1 else "bfd"
        packing = pack(
            self.samples, cfg.token_budget, strategy=strategy, ranks=self.dist.world_size,
            seed=cfg.seed + epoch, truncation=cfg.truncation,
        )
        st = self.pack_stats = packing.stats
        if (st.skipped or st.truncated) and self.dist.is_main and self.epoch_loaded < 0:  # once per run
            # never a silent drop: say what the packer left out or cut (see leafe_fast.packing)
            warnings.warn(
                f"Trainer: the packer skipped {len(st.skipped)} sample(s) with no target token "
                f"(ids {st.skipped[:10]}) and truncated {len(st.truncated)} (truncation={cfg.truncation!r}); "
                "see Trainer.pack_stats", stacklevel=2)
        # the packer already shuffles the micro-batch order with the seed (deterministic: resumable)
        mbs = list(packing.for_rank(self.dist.rank))
        self._check_ranges(mbs)
        self.epoch_batches = mbs
        self.epoch_loaded = epoch
        if self.dist.world_size > 1:
            counts = torch.tensor([len(mbs)], dtype=torch.float64, device=self.device)
            lo = counts.clone()
            torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
            if lo.item() != counts.item():
                raise RuntimeError(
                    f"Trainer: ranks got different micro-batch counts ({int(lo.item())}..{int(counts.item())}); "
                    "use pack_strategy='balanced'"
                )
        return self.epoch_batches

    def _check_ranges(self, mbs: Sequence[Any]) -> None:
        """Token ids (targets are among them) inside the vocabulary and groups inside ``lambdas``, checked
        on the host numpy arrays (the packer builds ``rows`` inside each micro-batch: no check needed)."""
        for mb in mbs:
            if len(mb.input_ids) and (mb.input_ids.min() < 0 or mb.input_ids.max() >= self.vocab_size):
                raise ValueError(
                    f"Trainer: samples contain token id {int(mb.input_ids.max())} but the model's vocabulary has "
                    f"{self.vocab_size} entries (were the samples built with another tokenizer?)")
            if len(mb.group) and (mb.group.min() < 0 or mb.group.max() >= self.num_groups):
                raise ValueError(f"Trainer: a sample has group {int(mb.group.max())}, but lambdas has "
                                 f"{self.num_groups} entries")

    def _next_chunk(self) -> list[Any]:
        mbs = self._micro_batches(self.epoch)
        if self.cursor >= len(mbs):
            self.epoch += 1
            self.cursor = 0
            mbs = self._micro_batches(self.epoch)
        chunk = mbs[self.cursor : self.cursor + self.config.grad_accum]
        self.cursor += len(chunk)
        return chunk

    # ------------------------------------------------------------------------------------------ step
    def train_step(self, chunk: Sequence[Any]) -> dict[str, Any]:
        """One optimizer step over ``chunk`` (this rank's micro-batches); returns the step's metrics."""
        from leafe_fast.loss import group_norms

        cfg = self.config
        self.wrapper.train()
        batches = [as_batch(mb.to_torch(self.device)) for mb in chunk]
        norms = group_norms(
            [b.group for b in batches],
            [b.weights for b in batches] if cfg.norm_mode == "weight" else None,
            num_groups=self.num_groups,
            mode=cfg.norm_mode,
        ).to(self.device)
        G = self.num_groups
        stats = torch.zeros(3 * G + 3, dtype=torch.float64, device=self.device)
        for i, b in enumerate(batches):
            if self.fsdp:
                self.wrapper.set_requires_gradient_sync(i == len(batches) - 1)
            out = self.wrapper(b, norms)
            (out.loss * self.loss_scale).backward()
            stats[:G] += out.group_sums.detach().double()
            stats[G : 2 * G] += out.group_counts.detach().double()
            stats[2 * G : 3 * G] += out.group_weight_sums.detach().double()
            stats[3 * G] += out.loss.detach().double()
            stats[3 * G + 1] += b.input_ids.numel()
            stats[3 * G + 2] += b.rows.numel()
        grad_norm = None
        if cfg.max_grad_norm:
            gn = torch.nn.utils.clip_grad_norm_(self.wrapper.parameters(), cfg.max_grad_norm)
            grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        all_reduce_sum(stats)
        stats = stats.cpu()
        sums, counts, wsums = stats[:G], stats[G : 2 * G], stats[2 * G : 3 * G]
        denom = wsums if cfg.norm_mode == "weight" else counts
        self.step += 1
        tokens = int(stats[3 * G + 1])
        self.tokens_seen += tokens
        rec: dict[str, Any] = {
            "step": self.step,
            "loss": float(stats[3 * G]),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "target_tokens": int(stats[3 * G + 2]),
            "epoch": self.epoch,
        }
        for g in range(G):
            name = GROUP_NAMES[g] if g < len(GROUP_NAMES) else f"group{g}"
            rec[f"ce_{name}"] = float(sums[g] / denom[g]) if denom[g] > 0 else None
            rec[f"targets_{name}"] = int(counts[g])
        return rec

    # ------------------------------------------------------------------------------------------ loop
    def train(self, steps: int | None = None) -> TrainSummary:
        """Run to ``total_steps`` (or only ``steps`` more: a run can stop early and resume later)."""
        from tqdm.auto import tqdm

        cfg = self.config
        main = self.dist.is_main
        log = MetricsLog(self.out / "metrics.jsonl" if (self.out and main) else None)
        meter = Throughput(flops_per_token(self.num_params), self.peak_flops, self.dist.world_size)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (main and cfg.progress),
                   desc="train", unit="step", dynamic_ncols=True)
        t_start = time.perf_counter()
        tokens_start, targets = self.tokens_seen, 0
        last_ckpt = None
        window_tokens = 0
        try:
            stop = self.total_steps if steps is None else min(self.total_steps, self.step + steps)
            while self.step < stop:
                rec = self.train_step(self._next_chunk())
                window_tokens += rec["tokens"]
                targets += rec["target_tokens"]
                if self.step % cfg.log_every == 0 or self.step == stop:
                    rec.update(meter.measure(window_tokens))
                    window_tokens = 0
                    rec.update(memory_stats(self.device))
                    log.write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)
                self.history.append(rec)
                bar.update(1)
                if self.out and cfg.save_every and self.step % cfg.save_every == 0:
                    last_ckpt = self.save()
        finally:
            bar.close()
            log.close()
        seconds = time.perf_counter() - t_start
        tokens = self.tokens_seen - tokens_start
        if self.out and cfg.save_every and self.step != self._saved_step:
            last_ckpt = self.save()
        exported = self.export(self.out / "final") if (self.out and cfg.export) else None
        losses = [r["loss"] for r in self.history]
        tps = tokens / seconds if seconds > 0 else 0.0
        last = self.history[-1] if self.history else {}
        summary = TrainSummary(
            steps=len(self.history), tokens=tokens, target_tokens=targets, seconds=seconds, tokens_per_s=tps,
            final_loss=losses[-1] if losses else None, losses=losses,
            group_losses={k[3:]: v for k, v in last.items() if k.startswith("ce_") and v is not None},
            mfu=(tps * flops_per_token(self.num_params) / (self.peak_flops * self.dist.world_size))
            if self.peak_flops else None,
            memory=memory_stats(self.device),
            checkpoint=str(last_ckpt) if last_ckpt else None,
            export=str(exported) if exported else None,
            precision=self.precision,
        )
        if main and cfg.progress:
            print(summary.to_text())
        return summary

    # ------------------------------------------------------------------------------------------ state
    def train_state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "cursor": self.cursor, "tokens_seen": self.tokens_seen,
                "total_steps": self.total_steps, "world_size": self.dist.world_size, "precision": self.precision,
                "config": asdict(self.config)}

    def save(self, root: str | Path | None = None) -> Path:
        root = Path(root) if root else (self.out / "checkpoints" if self.out else None)
        if root is None:
            raise ValueError("Trainer.save: no directory (set TrainConfig.output_dir or pass one)")
        self._saved_step = self.step
        return save_checkpoint(root, self.step, model=self.wrapper, optimizer=self.optimizer, scheduler=self.scheduler,
                               train_state=self.train_state(), keep_last=self.config.keep_last)

    def resume(self, where: bool | str | Path = True) -> bool:
        """Load the latest (or the given) checkpoint; False when there is none to resume from."""
        if where is True:
            if not self.out:
                raise ValueError("Trainer.resume: resume=True needs TrainConfig.output_dir")
            path = latest_checkpoint(self.out / "checkpoints")
            if path is None:
                return False
        else:
            path = Path(where)
        st = load_checkpoint(path, model=self.wrapper, optimizer=self.optimizer, scheduler=self.scheduler)
        if st.get("world_size", 1) != self.dist.world_size:
            raise ValueError(
                f"Trainer.resume: checkpoint {path} was written with {st.get('world_size')} ranks, this run has "
                f"{self.dist.world_size}; the data position would not match"
            )
        if st.get("precision", self.precision) != self.precision:
            # Resuming bf16-pure optimizer state into fp32 masters (or back) would silently change the run.
            raise ValueError(
                f"Trainer.resume: checkpoint {path} was trained with precision {st.get('precision')!r}, this run "
                f"uses {self.precision!r}; set TrainConfig.precision to match"
            )
        self.step, self.epoch, self.cursor = st["step"], st["epoch"], st["cursor"]
        self.tokens_seen = st.get("tokens_seen", 0)
        return True

    def export(self, out_dir: str | Path) -> Path | None:
        """safetensors + config (+ tokenizer) loadable by ``AutoModelForCausalLM.from_pretrained``."""
        return export_pretrained(self.wrapper, self.hf_model, out_dir, tokenizer=self.tokenizer)

    # ------------------------------------------------------------------------------------------ misc
    def _resolve_peak_flops(self, peak: float | str | None) -> float | None:
        if peak is None or isinstance(peak, (int, float)):
            return float(peak) if peak else None
        if peak == "auto":
            if self.device.type == "cuda":
                return peak_flops_from_table(self.device) or measure_matmul_flops(self.device)
            return measure_matmul_flops(self.device, torch.float32, size=512, iters=5)
        if peak == "measure":
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            return measure_matmul_flops(self.device, dtype, size=8192 if self.device.type == "cuda" else 512)
        raise ValueError(f"TrainConfig.peak_flops: expected a number, 'auto', 'measure' or None, got {peak!r}")
