"""Several processes on one or many machines, with PyTorch's own stack: torchrun + torch.distributed.

torchrun starts the processes and tells each its place through the environment (`RANK`,
`LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`); `session()` turns that into a process
group (NCCL between GPUs, gloo on CPU) and this process's device (`cuda:LOCAL_RANK` on GPUs).
Without torchrun (or with one process) everything here is a no-op, so the single-process code
path is the same code.

The rest are the few collective steps training and inference need:
- `ShardSampler`: this rank's disjoint share of an epoch's slice draw (DistributedSampler's
  padding), so every rank runs the same number of steps, as DistributedDataParallel requires;
- `shard` / `unshard`: split a list of cases across ranks and put the gathered results back in
  the original order (validation, `ctseg predict`);
- `all_reduce`, `gather_dict`, `all_gather`, `broadcast`: combine per-rank values so every rank
  takes the same decision (best epoch, early stopping, time limit, learning rate, run folder);
- `main_first`: rank 0 writes shared files (phantom, cache) before the others read them.

Files shared between ranks (case folder, cache, run folder) must be on a filesystem every node
sees; only rank 0 writes run outputs.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from ctseg.errors import ConfigError
from ctseg.utils import pick_device

logger = logging.getLogger(__name__)

T = TypeVar("T")

# While rank 0 alone reads a case folder into the cache or scores the best checkpoint, the others
# wait in a barrier: NCCL's 10-minute default would abort them on a large case folder.
GROUP_TIMEOUT = timedelta(hours=1)


def launched() -> bool:
    """True when torchrun (or an equivalent launcher) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's global rank: the group's, else the launcher's `RANK` (0 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the group (1 when no group is running)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main() -> bool:
    """Rank 0: the one process that writes run outputs and logs to MLflow."""
    return rank() == 0


def _local_device(requested: str | None) -> torch.device:
    device = pick_device(requested)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(f"--device {requested}: under torchrun each process uses cuda:LOCAL_RANK; "
                          "give --device cuda and choose GPUs with CUDA_VISIBLE_DEVICES")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"process LOCAL_RANK={local_rank} has no GPU: this node has "
                          f"{torch.cuda.device_count()}; start at most that many processes per node")
    return torch.device("cuda", local_rank)


@contextmanager
def session(device: str | None = None) -> Iterator[torch.device]:
    """This process's device, inside a process group when the launcher started several.

    The group is created from torchrun's environment (NCCL for CUDA, gloo for CPU) and destroyed
    on exit. An already running group (set up by the caller) is used as is and left running.
    """
    if not launched():
        yield pick_device(device)
        return
    local = _local_device(device)
    if dist.is_initialized():
        yield local
        return
    if local.type == "cuda":
        torch.cuda.set_device(local)
    backend = "nccl" if local.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=GROUP_TIMEOUT)
    logger.info("process group: rank %d of %d (%s), device %s", rank(), world_size(), backend, local)
    try:
        yield local
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (writing shared files), the other ranks after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def _collective_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    """`values` summed (op="sum") or maximised (op="max") element-wise over all ranks."""
    if world_size() == 1:
        return [float(v) for v in values]
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=ops[op])
    return tensor.tolist()


def all_finite(value: torch.Tensor) -> bool:
    """Whether `value` is finite on every rank (so all ranks skip a bad batch together)."""
    finite = bool(torch.isfinite(value).all())
    if world_size() == 1:
        return finite
    return all_reduce([0.0 if finite else 1.0], op="max")[0] == 0.0


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's `obj` (picklable) on every rank, e.g. a default run-folder name holding a time."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_dict(part: dict) -> dict:
    """The union of every rank's dict (keys disjoint, e.g. per-case metrics), on every rank."""
    merged: dict = {}
    for other in all_gather(part):
        merged.update(other)
    return merged


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: positions rank, rank + world, ... (each item on one rank)."""
    return list(items[rank()::world_size()])


def unshard(parts: Sequence[Sequence[T]]) -> list[T]:
    """Inverse of `shard`: the per-rank lists (in rank order) back in the original item order."""
    out: list[T] = []
    for i in range(max((len(p) for p in parts), default=0)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


class ShardSampler(Sampler[int]):
    """This rank's share of another sampler's draw.

    Every rank builds the same base sampler (same per-epoch generator), draws the epoch's
    indices, and keeps positions rank, rank + world, ... of them: the shares are disjoint, their
    union is the epoch, and a new epoch (new generator) reshuffles them. As in torch's
    DistributedSampler, the draw is padded by wrapping around so every rank gets
    ceil(n / world) indices and runs the same number of steps.
    """

    def __init__(self, sampler: Sampler[int], num_replicas: int | None = None,
                 replica: int | None = None) -> None:
        self.sampler = sampler
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.replica = rank() if replica is None else replica

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        indices = list(self.sampler)
        positions = DistributedSampler(indices, num_replicas=self.num_replicas, rank=self.replica,
                                       shuffle=False, drop_last=False)
        return iter([indices[p] for p in positions])


def rank_generator(generator: torch.Generator) -> torch.Generator:
    """A generator for this rank's augmentations, derived from `generator`'s seed.

    Ranks sharing one augmentation stream would rotate/flip their k-th slices identically;
    this keeps them independent and still a function of (seed, epoch, rank).
    """
    return torch.Generator().manual_seed((generator.initial_seed() * 1_000_003 + rank()) % 2**63)


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` with BatchNorm synchronised across ranks (`train.sync_bn`); unchanged for one process."""
    if world_size() == 1:
        return model
    if device.type != "cuda":
        raise ConfigError("train.sync_bn needs CUDA: PyTorch's SyncBatchNorm does not run on CPU; "
                          "set train.sync_bn=false for CPU processes")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel (gradients averaged across ranks); as is for one process.

    Train through the returned module; save, validate and predict with `model` itself (no
    `module.` prefix in checkpoints, and no collective inside per-rank validation).
    """
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
