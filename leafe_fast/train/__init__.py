"""Stage-2 training: model loading with varlen attention, the Trainer, FSDP2, checkpoints, metrics."""

from leafe_fast.train.config import CheckpointConfig, ComputeConfig, DataConfig, OptimConfig, TrainConfig
from leafe_fast.train.model import LeafeCausalLM, load_model
from leafe_fast.train.trainer import Trainer, TrainSummary

__all__ = ["CheckpointConfig", "ComputeConfig", "DataConfig", "LeafeCausalLM", "OptimConfig", "TrainConfig",
           "Trainer", "TrainSummary", "load_model"]
