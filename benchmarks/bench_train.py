"""Training throughput: leafe-fast against Hugging Face peers, same model and data, in one run.

Model: random init from a config written below (Qwen2.5-1.5B or 0.5B shapes; nothing is downloaded).
Data: LEAFE-shaped samples, multi-turn (observation turns are context, action turns are targets, about
25% target tokens, 70% rehearsal / 30% counterfactual), lengths uniform in [--min-len, --max-len].

Peers (each: fresh model with the same seed, AdamW, optional activation checkpointing, same samples, same
precision: bf16-mixed on CUDA = fp32 master weights and AdamW state, bf16 autocast compute, which is what
leafe-fast trains with by default and what HF's Trainer does with ``bf16=True``; fp32 on the CPU):

- ``leafe-fast``        packed varlen micro-batches (best-fit-decreasing, --token-budget tokens), our varlen
                        attention, Liger RMSNorm and SwiGLU when installed, fused LEAFE loss on hidden states
- ``hf-padded-eager``   HF model (SDPA), padded batches of --hf-batch samples, labels -100, HF's own loss
                        (full [B, T, V] logits, eager cross-entropy)
- ``hf-packed-eager``   HF model (SDPA), the same padding-free rows as below, HF's own loss (full logits)
- ``hf-liger-padded``   the padded batches of ``hf-padded-eager`` on an HF model patched by Liger (RoPE,
                        RMSNorm, SwiGLU, fused linear CE): what a user of HF's Trainer with
                        ``use_liger_kernel=True`` trains with; skipped with a note when liger-kernel or CUDA
                        is missing
- ``hf-liger-packed``   the same Liger-patched model on padding-free rows (samples concatenated,
                        position_ids restart; HF builds the packed mask); skipped likewise

Reported per peer: real (non-pad) tokens/s, MFU = tokens/s * 6N / peak (N = parameters without the
input embedding unless tied; peak = a bf16 matmul rate measured in this run on CUDA, an fp32 one on the
CPU), peak memory (CUDA allocator; on the CPU no per-peer figure), and the loss of the first step.

  python -m benchmarks.bench_train --config qwen2.5-1.5b        # one GPU (H100: still to be measured)
  python -m benchmarks.bench_train --small                     # CPU, tiny config, < 3 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import time
from typing import Any

import numpy as np
import torch

try:
    from benchmarks.common import env_info, save_plot, sync, time_fn, write_result
except ImportError:  # run as a plain script from benchmarks/
    from common import env_info, save_plot, sync, time_fn, write_result  # type: ignore[no-redef]

from leafe_fast.data.columns import Sample, SampleColumns
from leafe_fast.train.metrics import measure_matmul_flops

CONFIGS: dict[str, dict[str, Any]] = {
    # Shapes of the public Qwen2.5 configs (vocabulary, widths, depths, GQA, RoPE base, tied embeddings).
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # CPU smoke size: runs end to end in well under three minutes on two cores.
    "tiny": dict(vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
}


def make_config(name: str):
    from transformers import Qwen2Config

    return Qwen2Config(**CONFIGS[name], attention_dropout=0.0, use_sliding_window=False)


def leafe_samples(n: int, vocab: int, min_len: int, max_len: int, seed: int = 0) -> SampleColumns:
    """Multi-turn samples: a prompt, then (observation, action) turns; actions (~25% of tokens) are targets."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        L = int(rng.integers(min_len, max_len + 1))
        mask = np.zeros(L, dtype=bool)
        pos = int(rng.integers(L // 20 + 1, L // 8 + 2))  # system prompt + task
        while pos < L:
            obs = int(rng.integers(60, 240))
            act = max(1, int(obs / 2.4 * rng.uniform(0.6, 1.4)))
            pos += obs
            mask[pos : min(L, pos + act)] = True
            pos += act
        mask[0] = False
        ids = rng.integers(0, vocab, size=L).astype(np.int32)
        out.append(Sample(ids, mask, group=int(rng.random() < 0.3), weight=1.0, tree_id=j // 4))
    return SampleColumns.from_samples(out)


@contextlib.contextmanager
def _stock_modeling_code():
    """Undo Liger's process-wide patches when a peer is done.

    Liger's instance patching also rebinds names in ``modeling_qwen2`` (RoPE function, RMSNorm and MLP
    classes); without this, every HF model built after the leafe-fast peer would silently run Liger
    kernels and the "eager" peers would not be what their names say.
    """
    from transformers.models.qwen2 import modeling_qwen2

    saved = dict(vars(modeling_qwen2))
    try:
        yield
    finally:
        for name in [k for k in vars(modeling_qwen2) if k not in saved]:
            delattr(modeling_qwen2, name)
        for name, value in saved.items():
            if getattr(modeling_qwen2, name, None) is not value:
                setattr(modeling_qwen2, name, value)


def _reset_mem(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mem(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _measure(prepared: dict[str, dict[str, Any]], warmup: int, device: torch.device) -> None:
    """Time the prepared peers' steps in place: warm-up steps untimed, then the rest.

    With several peers prepared at once (the CPU mode) the timed steps are interleaved round-robin, so
    load from other processes on a shared machine hits every peer alike. Each step returns
    (real tokens, loss).
    """
    for res in prepared.values():
        res.update(tokens=0, seconds=0.0, step_s=[], first_loss=None)
        for fn in res["steps"][:warmup]:
            _, loss = fn()
            res["first_loss"] = loss if res["first_loss"] is None else res["first_loss"]
    sync(device)
    rounds = max(len(r["steps"]) for r in prepared.values()) - warmup
    for i in range(rounds):
        for res in prepared.values():
            if warmup + i >= len(res["steps"]):
                continue
            t0 = time.perf_counter()
            n, loss = res["steps"][warmup + i]()
            sync(device)
            dt = time.perf_counter() - t0
            res["tokens"] += n
            res["seconds"] += dt
            res["step_s"].append(dt)
            res["first_loss"] = loss if res["first_loss"] is None else res["first_loss"]
    for res in prepared.values():
        res["tokens_per_s"] = res["tokens"] / res["seconds"] if res["seconds"] else None
        res["timed_steps"] = len(res["step_s"])
        res["median_step_s"] = float(np.median(res["step_s"])) if res["step_s"] else None
        del res["steps"]


def _optimizer(model, device):
    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")


def run_leafe(args, cfg, samples, device, dtype) -> dict[str, Any]:
    from leafe_fast.packing import pack
    from leafe_fast.train import TrainConfig, Trainer, load_model

    model = load_model(cfg, dtype=dtype, precision=args.precision, device=device, liger="auto", seed=args.seed)
    trainer = Trainer(model, samples, TrainConfig(max_steps=10**6, token_budget=args.token_budget, grad_accum=1, lr=1e-5,
                                                  activation_checkpointing=args.ac, progress=False,
                                                  peak_flops=None, max_grad_norm=1.0, precision=args.precision))
    mbs = pack(samples, args.token_budget, seed=args.seed, layout="flat").micro_batches  # --trie compares layouts
    # One untimed step on every distinct micro-batch first: on the CPU the attention backend is chosen by timing
    # it once per shape bucket, and that one-off measurement must not land in the timed steps.
    for mb in mbs:
        trainer.train_step([mb])
    need = args.warmup + args.steps
    mbs = (mbs * math.ceil(need / len(mbs)))[:need]

    def step(mb):
        def fn():
            rec = trainer.train_step([mb])
            return rec["tokens"], rec["loss"]
        return fn

    from leafe_fast.train.attention import select_backend

    return {"steps": [step(mb) for mb in mbs], "liger_applied": bool(getattr(model, "leafe_liger", False)),
            "attention": select_backend(device, num_tokens=args.token_budget), "micro_batch_tokens": args.token_budget}


def _hf_model(cfg, device, dtype, ac, seed, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device (a 1.5B init on the CPU alone takes minutes)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    if ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _autocast(device: torch.device, precision: str):
    """The HF peers' forward context: bf16 autocast over fp32 weights for bf16-mixed, nothing otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def _labels(s: Sample) -> np.ndarray:
    lab = np.where(s.target_mask, s.input_ids, -100).astype(np.int64)
    return lab


def _apply_liger(model) -> None:
    """Liger's kernels on this model instance only (RoPE, RMSNorm, SwiGLU, fused linear CE in HF's loss)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)


def _liger_missing() -> dict[str, Any] | None:
    from leafe_fast.train.liger import liger_fused_ce_available

    return None if liger_fused_ce_available() else {"skipped": "liger-kernel on CUDA is not available here"}


def run_hf_padded(args, cfg, samples, device, dtype, liger: bool = False) -> dict[str, Any]:
    """Padded batches of ``--hf-batch`` samples (attention mask, labels -100); HF's loss, or Liger's."""
    model = _hf_model(cfg, device, dtype, args.ac, args.seed)
    if liger:
        _apply_liger(model)
    opt = _optimizer(model, device)
    items = samples.to_samples()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(items))
    batches = [order[i : i + args.hf_batch] for i in range(0, len(order), args.hf_batch)]
    need = args.warmup + args.steps
    batches = (batches * math.ceil(need / len(batches)))[:need]

    def step(idx):
        def fn():
            group = [items[i] for i in idx]
            T = max(len(s) for s in group)
            ids = np.zeros((len(group), T), np.int64)
            att = np.zeros((len(group), T), np.int64)
            # HF's loss shifts labels itself: labels[t] is the token at t, -100 where not a target
            lab = np.full((len(group), T), -100, np.int64)
            for r, s in enumerate(group):
                ids[r, : len(s)] = s.input_ids
                att[r, : len(s)] = 1
                lab[r, : len(s)] = _labels(s)
            t = lambda x: torch.as_tensor(x, device=device)  # noqa: E731
            with _autocast(device, args.precision):
                out = model(input_ids=t(ids), attention_mask=t(att), labels=t(lab))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return int(att.sum()), float(out.loss.detach())
        return fn

    return {"steps": [step(b) for b in batches], "batch_size": args.hf_batch, "liger_applied": liger}


def run_hf_liger_padded(args, cfg, samples, device, dtype) -> dict[str, Any]:
    return _liger_missing() or run_hf_padded(args, cfg, samples, device, dtype, liger=True)


def run_hf_liger_packed(args, cfg, samples, device, dtype) -> dict[str, Any]:
    return _liger_missing() or run_hf_packed(args, cfg, samples, device, dtype, liger=True)


def run_hf_packed(args, cfg, samples, device, dtype, liger: bool = False) -> dict[str, Any]:
    """Padding-free HF rows (position_ids restart per sample); HF's loss, or Liger's fused one."""
    from leafe_fast.packing import pack

    model = _hf_model(cfg, device, dtype, args.ac, args.seed)
    if liger:
        _apply_liger(model)
    opt = _optimizer(model, device)
    packs = pack(samples, args.token_budget, seed=args.seed).micro_batches
    need = args.warmup + args.steps
    packs = (packs * math.ceil(need / len(packs)))[:need]

    def step(mb):
        def fn():
            # the same packed rows leafe-fast trains on; HF shifts labels inside the row, so label t is the
            # target predicted from position t - 1 = rows + 1 (a sample's first token is never a label)
            ids, pos = mb.input_ids.astype(np.int64), mb.position_ids.astype(np.int64)
            lab = np.full(len(ids), -100, np.int64)
            lab[mb.rows + 1] = mb.targets
            t = lambda x: torch.as_tensor(x, device=device)[None]  # noqa: E731
            with _autocast(device, args.precision):
                out = model(input_ids=t(ids), position_ids=t(pos), labels=t(lab))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return len(ids), float(out.loss.detach())
        return fn

    return {"steps": [step(mb) for mb in packs], "micro_batch_tokens": args.token_budget, "liger_applied": liger}


PEERS = {"leafe-fast": run_leafe, "hf-padded-eager": run_hf_padded, "hf-liger-padded": run_hf_liger_padded,
         "hf-packed-eager": run_hf_packed, "hf-liger-packed": run_hf_liger_packed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CPU smoke run with the tiny config")
    p.add_argument("--config", default=None, choices=sorted(CONFIGS), help="model shapes (default by mode)")
    p.add_argument("--samples", type=int, default=None, help="number of samples")
    p.add_argument("--min-len", type=int, default=None)
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--token-budget", type=int, default=None, help="tokens per packed micro-batch")
    p.add_argument("--hf-batch", type=int, default=4, help="samples per padded batch of the HF peer")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per peer")
    p.add_argument("--no-ac", dest="ac", action="store_false", help="no activation checkpointing")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16-mixed", "bf16-pure", "fp32"],
                   help="every peer's precision (auto: bf16-mixed on CUDA, fp32 on the CPU)")
    p.add_argument("--name", default=None, help="result file name (default: train_<device>_<config>)")
    p.add_argument("--trie", action="store_true",
                   help="instead: trie vs flat layout on LEAFE-shaped trees (train_trie_<device>.json)")
    p.add_argument("--trees", type=int, default=None, help="--trie: number of synthetic trees")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        p.error(f"--peers: unknown peer(s) {unknown or [args.peers]}; choose from {','.join(PEERS)}")
    if args.trie:
        return run_trie(args)

    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    from leafe_fast.train.precision import master_dtype, resolve_precision

    args.precision = resolve_precision(args.precision, device)
    dtype = master_dtype(args.precision)  # parameter dtype of every peer (fp32 masters for bf16-mixed)
    defaults = (dict(config="qwen2.5-1.5b", samples=48, min_len=2048, max_len=8192, token_budget=16384, warmup=2, steps=6)
                if cuda else dict(config="tiny", samples=32, min_len=128, max_len=768, token_budget=1024, warmup=1,
                                  steps=10))
    for k, v in defaults.items():
        if getattr(args, k.replace("-", "_")) is None:
            setattr(args, k.replace("-", "_"), v)
    if not cuda and args.ac and args.small:
        args.ac = False  # the tiny CPU model fits easily; recomputation would only slow the smoke run
    cfg = make_config(args.config)
    samples = leafe_samples(args.samples, cfg.vocab_size, args.min_len, args.max_len, seed=args.seed)
    lengths = samples.lengths
    target_share = float(samples.target_mask.sum() / len(samples.tokens))

    from transformers import AutoModelForCausalLM

    from leafe_fast.train.model import count_parameters

    with torch.device("meta"):  # shapes only: no memory, no init time
        n_params = count_parameters(AutoModelForCausalLM.from_config(cfg))
    if cuda:
        peak = measure_matmul_flops(device, torch.bfloat16, size=8192)
        peak_kind = "measured bf16 8192^3 matmul"
    else:
        peak = measure_matmul_flops(device, torch.float32, size=1024, iters=10)
        peak_kind = "measured fp32 1024^3 matmul (CPU)"
    print(f"bench_train: {args.config} ({n_params / 1e6:.1f}M params w/o input embedding), {len(samples)} samples "
          f"{int(lengths.min())}-{int(lengths.max())} tokens, {100 * target_share:.1f}% targets, device {device}, "
          f"precision {args.precision}, "
          f"peak {peak / 1e12:.2f} TFLOP/s ({peak_kind})")

    results: dict[str, Any] = {}
    interleave = not cuda  # GPU: one peer at a time (memory); CPU: all at once, steps interleaved
    groups = [names] if interleave else [[n] for n in names]
    for group in groups:
        _reset_mem(device)
        t0 = time.perf_counter()
        prepared = {}
        with _stock_modeling_code():  # each peer sees stock transformers code (GPU: one peer a group)
            for name in group:
                try:
                    prepared[name] = PEERS[name](args, cfg, samples, device, dtype)
                except torch.cuda.OutOfMemoryError as exc:
                    results[name] = {"oom": str(exc).splitlines()[0]}
            runnable = {k: v for k, v in prepared.items() if "steps" in v}
            results.update({k: v for k, v in prepared.items() if "steps" not in v})
            try:
                _measure(runnable, args.warmup, device)
            except torch.cuda.OutOfMemoryError as exc:
                runnable = {k: {"oom": str(exc).splitlines()[0]} for k in runnable}
        for name, res in runnable.items():
            if res.get("tokens_per_s"):
                res["mfu"] = res["tokens_per_s"] * 6 * n_params / peak
                res["peak_mem_gib"] = _peak_mem(device)
            res["wall_s"] = time.perf_counter() - t0
            results[name] = res
        del prepared, runnable
        _reset_mem(device)
    for name in names:
        res = results[name]
        shown = (f"{res['tokens_per_s']:,.0f} tok/s, MFU {100 * res['mfu']:.2f}%"
                 + (f", {res['peak_mem_gib']:.1f} GiB" if res.get("peak_mem_gib") else "")
                 if res.get("tokens_per_s") else res.get("skipped") or res.get("oom"))
        print(f"  {name:18s} {shown}")

    results = {n: results[n] for n in names}
    ours = results.get("leafe-fast", {}).get("tokens_per_s")
    peers = {k: v["tokens_per_s"] for k, v in results.items() if k != "leafe-fast" and "tokens_per_s" in v}
    best = max(peers.items(), key=lambda kv: kv[1]) if peers else None
    ratio = ours / best[1] if (ours and best) else None
    if ratio:
        print(f"  leafe-fast / best peer ({best[0]}): {ratio:.2f}x tokens/s")
    # the training goal is stated against HF + Liger on padded batches: its own ratio, when it ran
    vs_liger_padded = ours / peers["hf-liger-padded"] if (ours and peers.get("hf-liger-padded")) else None
    env = env_info()
    name = args.name or f"train_{'cuda' if cuda else 'cpu'}_{'small' if args.small else args.config}"
    payload = {
        "benchmark": "train",
        "note": ("CPU run of the tiny config: a smoke test of the benchmark, not a GPU number"
                 if not cuda else "GPU run"),
        "config_name": args.config,
        "model_config": CONFIGS[args.config],
        "params_without_input_embedding": n_params,
        "flops_per_token": 6 * n_params,
        "peak_flops": peak,
        "peak_flops_kind": peak_kind,
        "precision": args.precision,
        "precision_detail": {"bf16-mixed": "fp32 master weights + AdamW state, bf16 autocast compute",
                             "bf16-pure": "bf16 weights + AdamW state updated directly",
                             "fp32": "fp32 weights and compute"}[args.precision],
        "param_dtype": str(dtype),
        "activation_checkpointing": args.ac,
        "data": {"samples": len(samples), "min_len": int(lengths.min()), "max_len": int(lengths.max()),
                 "mean_len": float(lengths.mean()), "target_share": target_share,
                 "counterfactual_share": float(np.mean(samples.group == 1))},
        "token_budget": args.token_budget, "hf_batch": args.hf_batch, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "timing": "peers interleaved step by step (CPU)" if interleave else "one peer after another",
        "results": results,
        "speedup_vs_best_peer": ratio,
        "best_peer": best[0] if best else None,
        "speedup_vs_hf_liger_padded": vs_liger_padded,
        "env": env,
    }
    path = write_result(name, payload)
    labels = names
    save_plot(name, labels, [results[k].get("tokens_per_s") for k in labels], ylabel="real tokens/s (higher is better)",
              title=f"train {args.config} on {env['device']} ({args.precision}); n/a = skipped or OOM")
    print(f"bench_train: wrote {path}")
    return 0


# ----------------------------------------------------------------------------------- trie vs flat layout
def run_trie(args: argparse.Namespace) -> int:
    """Train-step wall time of the same samples packed flat and as tries; speed-up against token compression.

    CUDA: the configured Qwen2.5 shapes in bf16-mixed, flash varlen (flat) against the compiled flex tree mask
    (trie). CPU: the tiny config in fp32, each layout's attention backend chosen by measurement.
    """
    import os

    from leafe_fast.packing import pack
    from leafe_fast.train import TrainConfig, Trainer, load_model
    from leafe_fast.train.attention import measured_backends

    try:
        from benchmarks.trie_data import TreeShape, leafe_trees
    except ImportError:
        from trie_data import TreeShape, leafe_trees  # type: ignore[no-redef]

    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    from leafe_fast.train.precision import master_dtype, resolve_precision

    precision = resolve_precision(args.precision, device)
    if cuda:
        config, shape, budget, trees = args.config or "qwen2.5-0.5b", TreeShape(), args.token_budget or 32768, args.trees or 16
    else:  # LEAFE-shaped but scaled to what two shared cores train in minutes
        config, budget, trees = args.config or "tiny", args.token_budget or 4096, args.trees or 12
        shape = TreeShape(steps=(6, 10), step_tokens=(40, 100), prompt_tokens=(100, 200), continue_steps=(2, 5),
                          vocab=8192)
    cfg = make_config(config)
    shape.vocab = min(shape.vocab, cfg.vocab_size)
    samples = leafe_trees(trees, shape, seed=args.seed)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "train_trie", "env": env_info(), "load_avg_at_start": os.getloadavg(),
                              "config": config, "precision": precision, "budget": budget, "trees": trees,
                              "samples": len(samples), "shape": shape.as_dict()}
    if cuda:  # FA3 for the flat flash path on Hopper when it measures faster than FA2 (process-wide)
        from leafe_fast.train.attention import prefer_fa3

        result["flash_impl"] = prefer_fa3(device)
    for layout in ("flat", "trie"):
        model = load_model(cfg, dtype=master_dtype(precision), precision=precision, device=device, liger="auto",
                           seed=args.seed)
        trainer = Trainer(model, samples, TrainConfig(max_steps=10**6, token_budget=budget, lr=1e-5, layout=layout,
                                                      truncation="left", progress=False, peak_flops=None,
                                                      precision=precision))
        packing = pack(samples, budget, layout=layout, truncation="left", seed=args.seed)
        mbs = packing.micro_batches

        def epoch():
            for mb in mbs:
                trainer.train_step([mb])

        t = time_fn(epoch, warmup=1, iters=args.steps or (2 if not cuda else 5))
        sec = t["median_ms"] / 1e3
        result[layout] = {"time_ms": t, "micro_batches": len(mbs), "flat_tokens": packing.stats.flat_tokens,
                          "computed_tokens": packing.stats.real_tokens,
                          "flat_equivalent_tokens_per_s": packing.stats.flat_tokens / sec,
                          "computed_tokens_per_s": packing.stats.real_tokens / sec}
        print(f"{layout}: {len(mbs)} micro-batches, {packing.stats.real_tokens:,} computed tokens, "
              f"{sec:.2f} s per pass, {packing.stats.flat_tokens / sec:,.0f} flat-equivalent tok/s")
        del trainer, model
        gc.collect()
    result["attention_choices"] = {str(k): v for k, v in measured_backends().items()}
    compression = result["flat"]["computed_tokens"] / result["trie"]["computed_tokens"]
    speedup = result["flat"]["time_ms"]["median_ms"] / result["trie"]["time_ms"]["median_ms"]
    result.update(compression=compression, speedup=speedup, speedup_over_compression=speedup / compression,
                  targets={"cpu_speedup_at_least_0.8x_compression": speedup >= 0.8 * compression} if not cuda else
                  {"gpu_effective_tokens_per_s_at_least_2x_flat":
                   result["trie"]["flat_equivalent_tokens_per_s"] >= 2 * result["flat"]["flat_equivalent_tokens_per_s"]},
                  load_avg_at_end=os.getloadavg(), wall_s=time.perf_counter() - t0,
                  notes="one pass = one optimizer step per micro-batch over all micro-batches (Trainer.train_step); "
                        "time_ms from benchmarks.common.time_fn (1 warm-up pass, which also makes the CPU "
                        "attention measurements). " + ("" if cuda else "CPU, 2-core VM shared with other jobs "
                        "(load averages recorded); the GPU figure (flex tree mask vs flash varlen) is still to be "
                        "measured."))
    name = args.name or f"train_trie_{'cuda' if cuda else 'cpu'}"
    path = write_result(name, result)
    save_plot(name, ["flat", "trie"], [result["flat"]["flat_equivalent_tokens_per_s"],
                                       result["trie"]["flat_equivalent_tokens_per_s"]],
              ylabel="flat-equivalent tokens/s (higher is better)",
              title=f"{config} {precision}: trie x{speedup:.2f} faster, tokens x{compression:.2f} fewer")
    print(f"compression {compression:.2f}x, speed-up {speedup:.2f}x ({speedup / compression:.2f} of compression); "
          f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
