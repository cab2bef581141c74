"""Stage-2 training: model loading with varlen attention, the Trainer, FSDP2, checkpoints, metrics."""

from leafe_fast.train.model import LeafeCausalLM, load_model
from leafe_fast.train.trainer import TrainConfig, Trainer, TrainSummary

__all__ = ["LeafeCausalLM", "TrainConfig", "Trainer", "TrainSummary", "load_model"]
