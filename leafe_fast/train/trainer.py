"""Stage-2 trainer: packed varlen micro-batches, fused LEAFE loss, AdamW, FSDP2, exact resume.

One optimizer step = ``grad_accum`` packed micro-batches per rank. Every micro-batch's loss divides each
group's term by a normaliser that is the same for all micro-batches of the step and all ranks (see
``TrainConfig.norm_scope``: the step's group totals, or the epoch's spread over its steps), so the
accumulated gradient is that of one big batch whatever the packing, accumulation or number of ranks.
The normalisers come from the packer's host arrays, computed once per epoch and all-reduced once per
epoch in float64: no device sync per micro-batch.

Run on one device with ``Trainer(model, samples, TrainConfig(...)).train()``; under ``torchrun`` the
same code shards the model with FSDP2 (see :mod:`leafe_fast.train.distributed`). On CUDA the default
precision is bf16-mixed: fp32 master weights and AdamW state, bf16 compute
(see :mod:`leafe_fast.train.precision`). Configuration: :mod:`leafe_fast.train.config`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from leafe_fast.data.columns import GROUP_NAMES
from leafe_fast.errors import UserError
from leafe_fast.train.config import TrainConfig
from leafe_fast.train.checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from leafe_fast.train.distributed import DistInfo, all_reduce_sum, apply_fsdp, init_distributed
from leafe_fast.train.precision import autocast_dtype, cast_to_master, resolve_precision
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

__all__ = ["EpochPlan", "TrainConfig", "TrainSummary", "Trainer", "packing_fingerprint", "step_norms"]


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
    computed_tokens: int | None = None  # tokens the model ran (fewer than ``tokens`` with the trie layout)

    def to_text(self) -> str:
        computed = (f", {self.computed_tokens:,} computed" if self.computed_tokens not in (None, self.tokens)
                    else "")
        parts = [f"{self.steps} steps", f"{self.tokens:,} tokens ({self.target_tokens:,} targets{computed})",
                 *([self.precision] if self.precision else []),
                 f"{self.seconds:.1f} s", f"{self.tokens_per_s:,.0f} tok/s"]
        if self.mfu is not None:
            parts.append(f"MFU {100 * self.mfu:.1f}%")
        if self.final_loss is not None:
            parts.append(f"final loss {self.final_loss:.4f}")
        parts += [f"{k} CE {v:.4f}" for k, v in self.group_losses.items()]
        return "train: " + ", ".join(parts)


@dataclass
class EpochPlan:
    """One epoch as this rank reads it: its micro-batches and every step's per-group normalisers.

    ``norms[s]`` (float64, on the training device) is what step ``s``'s micro-batches divide by; see
    ``TrainConfig``'s docstring for the two scopes. ``fingerprint`` identifies the packing of all ranks
    (a resume compares it), computed on first use.
    """

    epoch: int
    micro_batches: list[Any]
    norms: torch.Tensor  # [steps, G] float64
    steps: int
    packing: Any = None
    _fingerprint: str | None = None

    def step_batches(self, step: int, grad_accum: int) -> list[Any]:
        return self.micro_batches[step * grad_accum : (step + 1) * grad_accum]

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = packing_fingerprint(self.packing.micro_batches)
        return self._fingerprint


def packing_fingerprint(micro_batches: Sequence[Any]) -> str:
    """A 128-bit hash of what a packing feeds the model (ids, targets, weights, groups, order, ranks)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for mb in micro_batches:
        h.update(f"{mb.rank}:{mb.num_tokens}:{mb.num_targets}|".encode())
        for name in ("sample_ids", "cu_seqlens", "input_ids", "rows", "targets", "weights", "group"):
            h.update(memoryview(np.ascontiguousarray(getattr(mb, name))).cast("B"))
    return h.hexdigest()


def group_totals(micro_batches: Sequence[Any], num_groups: int, by_weight: bool) -> np.ndarray:
    """``[G]`` float64: each group's target count (or weight sum) over ``micro_batches``, from the packer's
    host arrays (no device work). Groups were range-checked before (``Trainer._check_ranges``)."""
    out = np.zeros(num_groups, dtype=np.float64)
    for mb in micro_batches:
        if len(mb.group):
            out += np.bincount(mb.group.astype(np.int64), weights=mb.weights if by_weight else None,
                               minlength=num_groups)[:num_groups]
    return out


def local_step_counts(micro_batches: Sequence[Any], grad_accum: int, num_groups: int, by_weight: bool) -> np.ndarray:
    """``[steps, G]`` float64: :func:`group_totals` of each optimizer step's micro-batches on this rank."""
    steps = math.ceil(len(micro_batches) / grad_accum)
    return np.stack([group_totals(micro_batches[s * grad_accum : (s + 1) * grad_accum], num_groups, by_weight)
                     for s in range(steps)]) if steps else np.zeros((0, num_groups))


def step_norms(global_counts: np.ndarray | torch.Tensor, scope: str) -> torch.Tensor:
    """Normalisers ``[steps, G]`` from the all-rank per-step totals ``[steps, G]`` (see ``TrainConfig``).

    ``"step"``: each step's own totals. ``"epoch"``: the epoch's total per group divided by the number of
    steps, the same for every step.
    """
    counts = torch.as_tensor(global_counts, dtype=torch.float64)
    if scope == "step":
        return counts.clone()
    if scope == "epoch":
        steps = counts.shape[0]
        return (counts.sum(0, keepdim=True) / max(1, steps)).expand(steps, -1).contiguous()
    raise ValueError(f"step_norms: scope must be 'step' or 'epoch', got {scope!r}")


# Fields that decide which tokens a step reads: a resume must find them unchanged (with the field's flag).
_ORDER_FIELDS = ("token_budget", "grad_accum", "pack_strategy", "truncation", "layout", "keep_trees_together",
                 "seed")


class Trainer:
    """Trains a causal LM (from :func:`leafe_fast.train.load_model`) on LEAFE samples.

    samples: ``SampleColumns`` or a list of ``Sample``. The packing is recomputed per epoch with seed
    ``seed + epoch`` (deterministic), so the data position saved in a checkpoint is just
    (epoch, micro-batch index); a resume checks that the packing it recomputes is the one the
    checkpoint was trained on (same data settings, same samples) and refuses otherwise.
    ``samples_path``: the file the samples were read from; errors about their contents (a group outside
    ``lambdas``, a token id outside the vocabulary) name it (``"samples"`` when None).
    """

    def __init__(
        self,
        model: nn.Module,
        samples: Any,
        config: TrainConfig | None = None,
        *,
        tokenizer: Any = None,
        dist_info: DistInfo | None = None,
        samples_path: str | Path | None = None,
    ):
        self.config = cfg = config or TrainConfig()
        # what errors about the samples' contents name: the file they came from (the CLI passes it), else "samples"
        self.samples_where = str(samples_path) if samples_path is not None else "samples"
        self.hf_model = model
        self.tokenizer = tokenizer
        self.samples = samples
        self.device = next(model.parameters()).device
        self.dist = dist_info or init_distributed(self.device)
        self.num_groups = cfg.loss.groups
        self.out = Path(cfg.checkpoint.output_dir) if cfg.checkpoint.output_dir else None

        comp = cfg.compute
        if comp.activation_checkpointing:
            enable_activation_checkpointing(model)
        use_fsdp = self.dist.distributed if comp.fsdp == "auto" else bool(comp.fsdp)
        self.fsdp = use_fsdp
        if self.dist.distributed and not use_fsdp:
            raise UserError("ComputeConfig.fsdp (--fsdp)", "several ranks need FSDP2; nothing else syncs gradients",
                            "pass --fsdp auto")
        # Resolved once ("auto" -> device default) and saved in train_state: a resume must use the same.
        self.precision = resolve_precision(comp.precision, self.device)
        cast_to_master(model, self.precision)  # before sharding and before the optimizer sees the params
        bf16_compute = autocast_dtype(self.precision)
        # One process: autocast in the wrapper. FSDP2: its mixed-precision policy gathers bf16 copies of the
        # fp32 shards instead, so the wrapper must not autocast on top of it.
        # Ranges are checked once per epoch on the host (_check_ranges), not by a device sync per micro-batch.
        self.wrapper = LeafeCausalLM(model, cfg.loss.with_overrides(check_ranges=False),
                                     autocast_dtype=None if use_fsdp else bf16_compute)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.num_params = count_parameters(model)
        # FSDP2 + accumulation: reduce-scatter after every micro-batch (sharded grads) or once per step.
        self.sync_every_micro_batch = use_fsdp and comp.sync_every_micro_batch(self.num_params)
        self.loss_scale = 1.0
        if use_fsdp:
            summed = apply_fsdp(self.wrapper, base_model(model).layers, param_dtype=bf16_compute,
                                reduce_dtype=torch.float32)
            if not summed:
                self.loss_scale = float(self.dist.world_size)
        self.optimizer = cfg.optim.build_optimizer(self.wrapper.named_parameters(), fused=self.device.type == "cuda")
        self.plan: EpochPlan | None = None
        self.steps_per_epoch = self._plan(0).steps
        if self.steps_per_epoch == 0:
            raise UserError(self.samples_where, "the samples produced no micro-batches", "check the samples file")
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.scheduler = cfg.optim.build_scheduler(self.optimizer, self.total_steps)
        self.step = 0
        self.epoch = 0
        self.cursor = 0  # index of the next micro-batch in this epoch (this rank's list)
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []
        self._saved_step = -1
        self.peak_flops = self._resolve_peak_flops(cfg.peak_flops)
        if cfg.checkpoint.resume:
            if not self.resume(cfg.checkpoint.resume) and self.dist.is_main:
                warnings.warn(f"Trainer: resume requested but {self.out / 'checkpoints'} holds no checkpoint; "
                              "starting from step 0", stacklevel=2)
        elif self.out and cfg.checkpoint.save_every:
            # A fresh run would mix its checkpoints with the old run's (keep_last prunes by step number, and
            # a later --resume could pick the old run's newest): refuse instead of overwriting silently.
            old = latest_checkpoint(self.out / "checkpoints")
            if old is not None:
                raise UserError(f"--out {self.out}", f"holds checkpoints of an earlier run (newest {old.name})",
                                "pass --resume to continue it, or another --out (or delete its checkpoints/)")

    # ------------------------------------------------------------------------------------------ data
    def _strategy(self) -> str:
        strategy = self.config.data.pack_strategy
        if strategy == "auto":
            strategy = "balanced" if self.dist.world_size > 1 else "bfd"
        return strategy

    def _pack(self, epoch: int) -> Any:
        from leafe_fast.packing import pack

        d = self.config.data
        extra: dict[str, Any] = {}
        if d.layout != "flat":  # the packer's layout hook (trie packing); flat is the packer's default
            extra["layout"] = d.layout
        try:
            return pack(self.samples, d.token_budget, strategy=self._strategy(), ranks=self.dist.world_size,
                        seed=d.seed + epoch, truncation=d.truncation, keep_trees_together=d.keep_trees_together,
                        **extra)
        except TypeError as exc:
            if extra and "layout" in str(exc):
                raise UserError("DataConfig.layout (--layout)", f"{d.layout!r} needs a packer with layouts; this "
                                "one packs flat only", "pass --layout flat") from None
            raise

    def _plan(self, epoch: int) -> EpochPlan:
        """This rank's micro-batches of ``epoch`` (seeded order) and the per-step normalisers (cached)."""
        if self.plan is not None and self.plan.epoch == epoch:
            return self.plan
        cfg = self.config
        packing = self._pack(epoch)
        st = self.pack_stats = packing.stats
        if (st.skipped or st.truncated) and self.dist.is_main and self.plan is None:  # once per run
            # never a silent drop: say what the packer left out or cut (see leafe_fast.packing)
            warnings.warn(
                f"Trainer: the packer skipped {len(st.skipped)} sample(s) with no target token "
                f"(ids {st.skipped[:10]}) and truncated {len(st.truncated)} "
                f"(truncation={cfg.data.truncation!r}); see Trainer.pack_stats", stacklevel=3)
        mixed = getattr(st, "mixed_trees", None)
        if mixed and self.dist.is_main and self.plan is None:  # trie layout: exact anyway, but likely a data bug
            warnings.warn(
                f"Trainer: {len(mixed)} tree id(s) hold samples whose prompts differ (ids {mixed[:10]}): samples of "
                "different tasks share a tree_id? They are packed as separate roots; see Trainer.pack_stats",
                stacklevel=3)
        # the packer already shuffles the micro-batch order with the seed (deterministic: resumable)
        mbs = list(packing.for_rank(self.dist.rank))
        self._check_ranges(mbs)
        G = self.num_groups
        counts = local_step_counts(mbs, cfg.data.grad_accum, G, cfg.norm_mode == "weight")
        steps = counts.shape[0]
        # One float64 all-reduce per epoch (exact for any count below 2^53), on the device NCCL needs, after
        # a check that every rank takes the same number of steps.
        if self.dist.world_size > 1:
            sizes = torch.tensor([steps, -steps], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)
            hi, lo = int(sizes[0].item()), -int(sizes[1].item())
            if hi != lo:
                raise RuntimeError(f"Trainer: ranks got different step counts ({lo}..{hi}); "
                                   "use pack_strategy='balanced'")
            total = torch.tensor(counts, device=self.device)
            all_reduce_sum(total)
        else:
            total = torch.from_numpy(counts)
        norms = step_norms(total.cpu(), cfg.norm_scope).to(self.device)
        self.plan = EpochPlan(epoch, mbs, norms, steps, packing)
        return self.plan

    def _check_ranges(self, mbs: Sequence[Any]) -> None:
        """Token ids (targets are among them) inside the vocabulary and groups inside ``lambdas``, checked
        on the host numpy arrays (the packer builds ``rows`` inside each micro-batch: no check needed)."""
        for mb in mbs:
            if len(mb.input_ids):
                lo, hi = int(mb.input_ids.min()), int(mb.input_ids.max())
                if lo < 0 or hi >= self.vocab_size:
                    bad = lo if lo < 0 else hi
                    raise UserError(self.samples_where, f"token id {bad} is outside the model's vocabulary "
                                    f"[0, {self.vocab_size})", "build the samples with this model's tokenizer")
            if len(mb.group):
                lo, hi = int(mb.group.min()), int(mb.group.max())
                if lo < 0 or hi >= self.num_groups:
                    bad = lo if lo < 0 else hi
                    raise UserError(self.samples_where, f"a sample has group {bad}, but lambdas has {self.num_groups} "
                                    "entries", f"pass one lambda per group (groups 0..{self.num_groups - 1})")

    def _next_step(self) -> tuple[list[Any], torch.Tensor]:
        """The next step's micro-batches (this rank) and its normalisers; moves the data position."""
        plan = self._plan(self.epoch)
        if self.cursor >= len(plan.micro_batches):
            self.epoch += 1
            self.cursor = 0
            plan = self._plan(self.epoch)
        ga = self.config.data.grad_accum
        s = self.cursor // ga
        chunk = plan.step_batches(s, ga)
        self.cursor += len(chunk)
        return chunk, plan.norms[s]

    # ------------------------------------------------------------------------------------------ step
    def train_step(self, chunk: Sequence[Any], norms: torch.Tensor | None = None) -> dict[str, Any]:
        """One optimizer step over ``chunk`` (this rank's micro-batches); returns the step's metrics.

        ``norms [G]``: the step's normalisers; None computes step-scope ones from ``chunk`` (all ranks).
        """
        cfg = self.config
        G = self.num_groups
        by_weight = cfg.norm_mode == "weight"
        # host-side numbers of the step (summed over ranks below with the loss statistics)
        counts, wsums = group_totals(chunk, G, False), group_totals(chunk, G, True)
        if norms is None:
            norms = all_reduce_sum(torch.tensor(wsums if by_weight else counts, device=self.device))
        self.wrapper.train()
        flat_tokens = sum(_flat_tokens(mb) for mb in chunk)
        computed = sum(int(mb.num_tokens) for mb in chunk)
        targets = sum(int(mb.num_targets) for mb in chunk)
        dev_stats = torch.zeros(G + 1, dtype=torch.float64, device=self.device)
        # every copy of the step queued up front (non-blocking), none waits behind a micro-batch's compute
        batches = [as_batch(mb.to_torch(self.device)) for mb in chunk]
        last = len(chunk) - 1
        for i, b in enumerate(batches):
            if self.fsdp:
                self.wrapper.set_requires_gradient_sync(self.sync_every_micro_batch or i == last)
            out = self.wrapper(b, norms)
            (out.loss * self.loss_scale).backward()
            dev_stats[:G] += out.group_sums.detach().double()
            dev_stats[G] += out.loss.detach().double()
        grad_norm = None
        if cfg.optim.max_grad_norm:
            gn = torch.nn.utils.clip_grad_norm_(self.wrapper.parameters(), cfg.optim.max_grad_norm)
            grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        host = torch.from_numpy(np.concatenate([counts, wsums, [flat_tokens, computed, targets]]))
        stats = all_reduce_sum(torch.cat([dev_stats, host.to(self.device)])).cpu()
        sums, loss = stats[:G], float(stats[G])
        counts_t, wsums_t = stats[G + 1 : 2 * G + 1], stats[2 * G + 1 : 3 * G + 1]
        flat_tokens, computed, targets = (int(x) for x in stats[3 * G + 1 :])
        denom = wsums_t if by_weight else counts_t
        self.step += 1
        self.tokens_seen += flat_tokens
        rec: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": flat_tokens,  # tokens of the samples (the flat layout's count): what the data holds
            "computed_tokens": computed,  # tokens the model ran (fewer with the trie layout)
            "target_tokens": targets,
            "epoch": self.epoch,
        }
        for g in range(G):
            name = GROUP_NAMES[g] if g < len(GROUP_NAMES) else f"group{g}"
            rec[f"ce_{name}"] = float(sums[g] / denom[g]) if denom[g] > 0 else None
            rec[f"targets_{name}"] = int(counts_t[g])
        return rec

    # ------------------------------------------------------------------------------------------ loop
    def train(self, steps: int | None = None) -> TrainSummary:
        """Run to ``total_steps`` (or only ``steps`` more: a run can stop early and resume later)."""
        from tqdm.auto import tqdm

        cfg = self.config
        main = self.dist.is_main
        ck = cfg.checkpoint
        if self.out and main:  # one record per step: drop records past this run's position (a fresh run: all)
            MetricsLog.truncate_after(self.out / "metrics.jsonl", self.step)
        log = MetricsLog(self.out / "metrics.jsonl" if (self.out and main) else None)
        meter = Throughput(flops_per_token(self.num_params), self.peak_flops, self.dist.world_size)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (main and cfg.progress and _is_tty()),
                   desc="train", unit="step", dynamic_ncols=True)
        t_start = time.perf_counter()
        tokens_start, targets = self.tokens_seen, 0
        computed_total = 0
        last_ckpt = None
        window_tokens = window_computed = 0
        try:
            stop = self.total_steps if steps is None else min(self.total_steps, self.step + steps)
            while self.step < stop:
                rec = self.train_step(*self._next_step())
                window_tokens += rec["tokens"]
                window_computed += rec["computed_tokens"]
                computed_total += rec["computed_tokens"]
                targets += rec["target_tokens"]
                if self.step % cfg.log_every == 0 or self.step == stop:
                    rec.update(meter.measure(window_tokens, window_computed))
                    window_tokens = window_computed = 0
                    rec.update(memory_stats(self.device))
                    try:
                        log.write(rec)
                    except OSError as exc:  # a full disk: one line; a resume drops a cut last record
                        raise UserError(str(log.path), f"could not be written ({exc.strerror or exc})",
                                        "free disk space, then rerun with --resume (from the newest checkpoint)"
                                        if ck.save_every else "free disk space and run again") from exc
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)
                self.history.append(rec)
                bar.update(1)
                if self.out and ck.save_every and self.step % ck.save_every == 0:
                    last_ckpt = self.save()
        finally:
            bar.close()
            log.close()
        seconds = time.perf_counter() - t_start
        tokens = self.tokens_seen - tokens_start
        if self.out and ck.save_every and self.step != self._saved_step:
            last_ckpt = self.save()
        exported = self.export(self.out / "final") if (self.out and ck.export) else None
        losses = [r["loss"] for r in self.history]
        tps = tokens / seconds if seconds > 0 else 0.0
        last = self.history[-1] if self.history else {}
        fpt = flops_per_token(self.num_params)
        summary = TrainSummary(
            steps=len(self.history), tokens=tokens, target_tokens=targets, seconds=seconds, tokens_per_s=tps,
            final_loss=losses[-1] if losses else None, losses=losses,
            group_losses={k[3:]: v for k, v in last.items() if k.startswith("ce_") and v is not None},
            mfu=(computed_total / seconds * fpt / (self.peak_flops * self.dist.world_size))
            if (self.peak_flops and seconds > 0) else None,
            memory=memory_stats(self.device),
            checkpoint=str(last_ckpt) if last_ckpt else None,
            export=str(exported) if exported else None,
            precision=self.precision,
            computed_tokens=computed_total,
        )
        if main and cfg.progress:
            print(summary.to_text())
        return summary

    # ------------------------------------------------------------------------------------------ state
    def data_order(self) -> dict[str, Any]:
        """What decides the tokens each step reads; saved in checkpoints and compared on resume."""
        d = self.config.data
        out: dict[str, Any] = {name: getattr(d, name) for name in _ORDER_FIELDS}
        out.update(world_size=self.dist.world_size, resolved_strategy=self._strategy())
        return out

    def train_state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "cursor": self.cursor, "tokens_seen": self.tokens_seen,
                "total_steps": self.total_steps, "world_size": self.dist.world_size, "precision": self.precision,
                "data_order": self.data_order(), "packing_fingerprint": self._plan(self.epoch).fingerprint,
                "config": dataclasses.asdict(self.config)}

    def save(self, root: str | Path | None = None) -> Path:
        root = Path(root) if root else (self.out / "checkpoints" if self.out else None)
        if root is None:
            raise UserError("CheckpointConfig.output_dir (--out)", "Trainer.save needs a directory",
                            "set output_dir or pass one")
        self._saved_step = self.step
        return save_checkpoint(root, self.step, model=self.wrapper, optimizer=self.optimizer, scheduler=self.scheduler,
                               train_state=self.train_state(), keep_last=self.config.checkpoint.keep_last)

    def resume(self, where: bool | str | Path = True) -> bool:
        """Load the latest (or the given) checkpoint; False when there is none to resume from.

        Refuses (``UserError``) a checkpoint from another number of ranks, another precision, other data
        settings (``DataConfig``: budget, accumulation, strategy, truncation, layout, seed) or other
        samples: any of these would silently read a different packing. ``train`` then drops the records
        of ``metrics.jsonl`` after the checkpoint's step, so the resumed run does not repeat steps.
        """
        if where is True:
            if not self.out:
                raise UserError("CheckpointConfig.resume (--resume)", "resume=True needs an output directory",
                                "set output_dir (--out) or pass a checkpoint path")
            path = latest_checkpoint(self.out / "checkpoints")
            if path is None:
                return False
        else:
            path = Path(where)
        st = load_checkpoint(path, model=self.wrapper, optimizer=self.optimizer, scheduler=self.scheduler,
                             validate=lambda state: self._check_resumable(state, f"--resume {path}"))
        self.step, self.epoch, self.cursor = st["step"], st["epoch"], st["cursor"]
        self.tokens_seen = st.get("tokens_seen", 0)
        return True

    def _check_resumable(self, st: dict[str, Any], where: str) -> None:
        """Raise ``UserError`` unless checkpoint state ``st`` continues this run's data order (see ``resume``)."""
        if st.get("world_size", 1) != self.dist.world_size:
            raise UserError(where, f"the checkpoint was written by {st.get('world_size')} ranks, this run has "
                            f"{self.dist.world_size}; the data position would not match",
                            f"run with {st.get('world_size')} ranks or start a new run")
        if st.get("precision", self.precision) != self.precision:
            # Resuming bf16-pure optimizer state into fp32 masters (or back) would silently change the run.
            raise UserError(where, f"the checkpoint was trained with precision {st.get('precision')!r}, this "
                            f"run uses {self.precision!r}", f"pass --precision {st.get('precision')}")
        now = self.data_order()
        for name, old in (st.get("data_order") or {}).items():
            if name in now and now[name] != old and name not in ("world_size", "resolved_strategy"):
                flag = "--" + name.replace("_", "-")
                raise UserError(where, f"the checkpoint was trained with {name}={old!r}, this run has "
                                f"{now[name]!r}: it would read a different packing", f"pass {flag} {old} or start "
                                "a new run in another --out")
        if st.get("step", 0) >= self.total_steps:
            # it would train 0 steps and re-export the checkpoint's (maybe later) weights as this run's result
            ends = (f"--max-steps {self.config.max_steps}" if self.config.max_steps
                    else f"--epochs {self.config.epochs:g}: {self.total_steps} steps")
            raise UserError(where, f"the checkpoint is at step {st['step']} and this run ends at step "
                            f"{self.total_steps} ({ends}): nothing is left to train",
                            f"pass --max-steps above {st['step']} to train further, or start a new run in "
                            "another --out")
        want = st.get("packing_fingerprint")
        if want is not None and self._plan(st["epoch"]).fingerprint != want:
            raise UserError(where, f"the samples pack differently from the ones the checkpoint was trained on "
                            f"(epoch {st['epoch']})", "resume with the same samples file, or start a new run")

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
        raise UserError("TrainConfig.peak_flops", f"expected a number, 'auto', 'measure' or None, got {peak!r}",
                        "pass a FLOP/s number or 'auto'")


def _flat_tokens(mb: Any) -> int:
    """Tokens of the micro-batch's samples back to back (the trie layout computes fewer: ``num_tokens``)."""
    flat = getattr(mb, "flat_tokens", -1)
    return int(flat) if flat is not None and flat >= 0 else int(mb.num_tokens)


def _is_tty() -> bool:
    import sys

    return sys.stderr.isatty()
