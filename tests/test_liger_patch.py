"""The Liger patch touches only the model instance it is given (issue 14 item 3g).

Runs without Liger and without a GPU: stand-in classes with Liger's constructor signatures take the
place of ``LigerRMSNorm`` / ``LigerSwiGLUMLP``; what is tested is our instance patch (which modules are
swapped, parameters shared, outputs unchanged, transformers' module globals and a second model untouched).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leafe_fast.train.liger import apply_liger, patch_instance


class FakeRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6, **_):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.variance_epsilon)).to(x.dtype)


class FakeSwiGLU(nn.Module):
    def __init__(self, config, intermediate_size=None):
        super().__init__()
        i = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, i, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, i, bias=False)
        self.down_proj = nn.Linear(i, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


def test_patch_swaps_only_this_instance_and_keeps_parameters_and_outputs():
    import transformers.models.qwen2.modeling_qwen2 as modeling

    globals_before = {k: getattr(modeling, k) for k in ("Qwen2RMSNorm", "Qwen2MLP", "apply_rotary_pos_emb")}
    model, other = _tiny_qwen2(), _tiny_qwen2()
    params_before = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
    counts = patch_instance(model, FakeRMSNorm, FakeSwiGLU)
    assert counts == {"rms_norm": 2 * 2 + 1, "swiglu": 2}  # two norms per layer + the final norm; one MLP per layer
    assert isinstance(model.model.norm, FakeRMSNorm) and isinstance(model.model.layers[0].mlp, FakeSwiGLU)
    assert {n: p for n, p in model.named_parameters()} == params_before  # the very same Parameter objects
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref)
    assert {k: getattr(modeling, k) for k in globals_before} == globals_before  # no process-wide rebinding
    assert type(other.model.norm).__name__ == "Qwen2RMSNorm"  # a second model is untouched
    assert patch_instance(model, FakeRMSNorm, FakeSwiGLU) == {"rms_norm": 0, "swiglu": 0}  # idempotent


def test_apply_liger_on_cpu_explains_and_can_be_required():
    model = _tiny_qwen2()
    assert apply_liger(model) is False
    with pytest.raises(RuntimeError, match="need CUDA"):
        apply_liger(model, required=True)
