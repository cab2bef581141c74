"""Process groups and FSDP2 for the trainer.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) ``init_distributed`` starts a process group:
NCCL on CUDA, gloo on the CPU (so the FSDP2 path is testable without a GPU). ``apply_fsdp`` shards the
model with ``fully_shard``: every decoder layer is its own unit (gathered just before it runs, freed
after), then the wrapper as the root unit holding embeddings, final norm and LM head.

Gradient scaling: our loss is already normalized by the global token count of the step (all ranks), so
each rank's loss is its share of one global sum and the gradients must be *summed* over ranks. FSDP2
averages by default; ``apply_fsdp`` sets the divide factor to 1 on every unit (or, on torch versions
without that setting, on none of them, and the trainer multiplies the loss by the world size instead:
``set_sum_reduction`` is all or nothing, so no unit is scaled twice).

Gradient accumulation (``grad_accum > 1``) has two schedules, ``ComputeConfig.grad_sync``: reduce-scatter
once per step (``set_requires_gradient_sync(False)`` on all but the last micro-batch: FSDP2 then keeps
every unit's *unsharded* gradient, fp32 under bf16-mixed, between micro-batches: 4 bytes x parameters
per rank) or after every micro-batch (only the sharded fp32 gradient stays: 4 bytes x parameters /
ranks, for ``grad_accum`` times the reduce-scatter traffic). ``"auto"`` picks the latter above 1e9
parameters. The per-step schedule is safe when ``4 * params`` bytes fit beside the activations.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Start (or join) the process group that torchrun described; a single process needs nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def apply_fsdp(
    wrapper: nn.Module,
    layers: list[nn.Module] | nn.ModuleList,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
) -> bool:
    """Shard each decoder layer, then the wrapper (root). Returns True when the gradient divide factor
    could be set to 1 (sum over ranks); False means the caller must scale the loss by the world size.

    bf16-mixed: ``param_dtype=bf16`` over fp32 parameters: the shards (and AdamW state) stay fp32, each
    unit gathers bf16 copies for its forward/backward, and gradients are reduce-scattered in
    ``reduce_dtype`` (fp32) into fp32 shard gradients. None keeps the parameters' own dtype for compute.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    # The root's forward inputs are the micro-batch and the per-group normalizers: casting those floats to
    # bf16 (the default for the root) would round the token counts the loss divides by (e.g. 1001 -> 1000).
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    fully_shard(wrapper, mp_policy=root_mp)
    units = [*layers, wrapper]
    # A divide factor of 1 is a PREMUL_SUM, which gloo lacks; forcing plain SUM gives the same result.
    force_sum = dist.is_initialized() and dist.get_backend() == "gloo"
    return set_sum_reduction(units, force_sum)


def set_sum_reduction(units: list[nn.Module], force_sum: bool) -> bool:
    """Make every FSDP unit *sum* gradients over ranks; False (and no unit changed) when one cannot.

    All or nothing: the caller's fallback (the loss times the world size, over FSDP's default average) is
    only right when no unit sums already; a unit that did both would get its gradients scaled twice.
    """
    needed = ["set_gradient_divide_factor"] + (["set_force_sum_reduction_for_comms"] if force_sum else [])
    if not all(hasattr(u, name) for u in units for name in needed):
        return False  # older FSDP2 builds: the caller scales the loss instead, on every unit alike
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        if force_sum:
            unit.set_force_sum_reduction_for_comms(True)
    return True


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks when distributed; identity otherwise."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
