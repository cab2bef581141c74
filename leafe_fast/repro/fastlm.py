"""Lock-step batched decoding of a small Qwen2/Llama-style model with a preallocated KV cache.

Why not ``leafe_fast.engines.hf.HFEngine`` for evaluation: it prefills each prompt alone (batch size
1), which is right for exploration's branching prefixes but costs a Python round trip per episode
per turn; evaluating 200 levels x 16 episodes x 40 turns is 128,000 of them. Here every episode of a
chunk advances one turn at a time in one batched forward: each row appends its own number of new
tokens (right-padded) to its own KV rows, and a query attends to the cached keys at absolute
positions up to its own. Nothing is shared between rows, so a row's logits do not depend on the
batch (up to float reassociation).

Sampling uses counter-based noise: the Gumbel noise of a token is a hash of (seed, episode key,
turn, position in the turn, token id), so an episode's random numbers do not depend on which other
episodes share its chunk, on the chunk size, or on the model being evaluated; arms evaluated with
the same seed see the same noise (common random numbers: differences between arms are less noisy).

Limits: full attention only (no sliding window), temperature sampling only (no top-p), the weights
are copied from a transformers model (``FastLM.from_hf``; ``tests/test_repro.py`` compares logits).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

_MASK31 = 0x7FFFFFFF


def hash31(*parts: torch.Tensor | int) -> torch.Tensor:
    """A 31-bit integer hash of int64 tensors/ints (broadcast). Every product stays below 2^62, so
    int64 arithmetic never overflows and the result is the same on every platform."""
    h = torch.zeros((), dtype=torch.int64)
    for p in parts:
        p = torch.as_tensor(p, dtype=torch.int64) & _MASK31
        h = (h * 31 + p) & _MASK31
        h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & _MASK31
        h = ((h ^ (h >> 12)) * 0x297A2D39) & _MASK31
        h = h ^ (h >> 15)
    return h


def gumbel_noise(seed: int, keys: torch.Tensor, turns: torch.Tensor | int, pos: int, vocab: int) -> torch.Tensor:
    """[len(keys), vocab] Gumbel(0, 1) noise, a pure function of its arguments (``turns``: one per row
    or one for all)."""
    tok = torch.arange(vocab, dtype=torch.int64)[None, :]
    turns = torch.as_tensor(turns, dtype=torch.int64)
    h = hash31(seed, keys[:, None], turns[:, None] if turns.ndim else turns, pos, tok)
    u = (h.double() + 0.5) / float(_MASK31 + 1)
    return (-torch.log(-torch.log(u))).float()


class FastLM(torch.nn.Module):
    """Inference-only twin of a Qwen2/Llama causal LM (weights copied), with batched KV decoding."""

    def __init__(self, hf_model: Any):
        super().__init__()
        cfg = hf_model.config
        inner = hf_model.model
        self.num_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.vocab = cfg.vocab_size
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
            raise ValueError("FastLM: sliding-window attention is not supported")
        rot = inner.rotary_emb
        self.register_buffer("inv_freq", rot.inv_freq.detach().clone().float(), persistent=False)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        self.embed = inner.embed_tokens.weight.detach().clone()
        self.final_norm = inner.norm.weight.detach().clone()
        self.lm_head = hf_model.lm_head.weight.detach().clone()
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp

            def w(lin):
                return lin.weight.detach().clone(), (lin.bias.detach().clone() if lin.bias is not None else None)

            qkv_w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().clone()
            biases = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
            qkv_b = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
            self.layers.append({
                "ln1": layer.input_layernorm.weight.detach().clone(),
                "ln2": layer.post_attention_layernorm.weight.detach().clone(),
                "qkv_w": qkv_w, "qkv_b": qkv_b, "o": w(a.o_proj),
                "gate_up": torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach().clone(),
                "down": m.down_proj.weight.detach().clone(),
            })

    @classmethod
    def from_hf(cls, hf_model: Any) -> "FastLM":
        return cls(hf_model)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def new_cache(self, batch: int, capacity: int) -> list[torch.Tensor]:
        """Per layer one [2, batch, kv_heads, capacity, head_dim] tensor (keys, values)."""
        return [torch.zeros(2, batch, self.n_kv, capacity, self.head_dim) for _ in range(self.num_layers)]

    @torch.no_grad()
    def forward_step(
        self, ids: torch.Tensor, counts: torch.Tensor, lengths: torch.Tensor, cache: list[torch.Tensor]
    ) -> torch.Tensor:
        """Append ``ids`` [B, T] (row b's first ``counts[b]`` valid, right-padded) after ``lengths[b]``
        cached tokens; returns the logits [B, vocab] at each row's last valid token. The caller
        adds ``counts`` to ``lengths`` afterwards. Padded positions write junk KV beyond the row's
        end, which the next call overwrites and no valid query ever attends to."""
        B, T = ids.shape
        pos = lengths[:, None] + torch.arange(T)[None, :]  # [B, T] absolute positions
        cap = cache[0].shape[3]
        if int(pos.max()) >= cap:
            raise ValueError(f"FastLM: KV capacity {cap} exceeded")
        L = int((lengths + counts).max())  # keys to look at this call
        freqs = pos[..., None].float() * self.inv_freq  # [B, T, hd/2]
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = (emb.cos() * self.rope_scale)[:, None], (emb.sin() * self.rope_scale)[:, None]
        key_pos = torch.arange(L)[None, None, :]
        mask = key_pos <= pos[:, :, None]  # [B, T, L]
        mask = mask[:, None]  # broadcast over heads
        x = self.embed[ids]
        rows = torch.arange(B)[:, None].expand(B, T)
        H, K, D = self.n_heads, self.n_kv, self.head_dim
        for lw, kv in zip(self.layers, cache):
            h = self._norm(x, lw["ln1"])
            qkv = F.linear(h, lw["qkv_w"], lw["qkv_b"])
            q, k, v = qkv.split([H * D, K * D, K * D], -1)
            q = q.view(B, T, H, D).transpose(1, 2)
            k = k.view(B, T, K, D).transpose(1, 2)
            v = v.view(B, T, K, D).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            # write this call's K/V at their absolute positions (padded slots land past the row's end)
            kv[0][rows, :, pos] = k.transpose(1, 2)
            kv[1][rows, :, pos] = v.transpose(1, 2)
            att = F.scaled_dot_product_attention(q, kv[0][:, :, :L], kv[1][:, :, :L], attn_mask=mask,
                                                 enable_gqa=H != K)
            x = x + F.linear(att.transpose(1, 2).reshape(B, T, H * D), lw["o"][0], lw["o"][1])
            h = self._norm(x, lw["ln2"])
            g, u = F.linear(h, lw["gate_up"]).chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, lw["down"])
        last = x[torch.arange(B), (counts - 1).clamp(min=0)]
        return F.linear(self._norm(last, self.final_norm), self.lm_head)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def pad_rows(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] ids and their counts."""
    counts = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    T = max(1, int(counts.max()) if len(rows) else 1)
    out = torch.zeros(len(rows), T, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.int64)
    return out, counts


def compact_cache(cache: list[torch.Tensor], keep: torch.Tensor) -> list[torch.Tensor]:
    """Only the rows ``keep`` (finished episodes leave the batch)."""
    return [kv[:, keep].contiguous() for kv in cache]


def sample_tokens(logits: torch.Tensor, temperature: float, seed: int, keys: torch.Tensor,
                  turns: torch.Tensor | int, pos: int) -> torch.Tensor:
    """Gumbel-max sampling with counter-based noise (greedy when ``temperature`` is 0)."""
    if temperature <= 0:
        return logits.argmax(-1)
    noise = gumbel_noise(seed, keys, turns, pos, logits.shape[-1])
    return (logits.float() / temperature + noise).argmax(-1)


__all__ = ["FastLM", "hash31", "gumbel_noise", "pad_rows", "compact_cache", "sample_tokens"]
