"""Process-group set-up for `torchrun`, the few collectives the trainer and the latent cache need, and how many
data-loading worker processes this machine can take."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from klvae.atomic import folder_lock, held_by_another
from klvae.errors import KlvaeError

log = logging.getLogger(__name__)

# Data workers per CPU beyond which more only fill memory: image decoding is CPU-bound, and a few per CPU are
# enough to hide the waits of a slow disk or network.
WORKERS_PER_CPU = 4


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, validates and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment (nccl on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    info = DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    return info


def all_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of `t` over ranks, in its dtype (identity for one process)."""
    if not info.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `t` over ranks (identity for one process)."""
    return all_sum(t, info) / info.world if info.enabled else t


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """Under torchrun, the GPU of this process's local rank (made current); otherwise `device` as given."""
    # "cuda" alone would put every rank on cuda:0; a single process keeps the GPU it was given (cuda:1, say).
    if device.type != "cuda" or not info.enabled:
        return device
    device = torch.device("cuda", info.local_rank)
    torch.cuda.set_device(device)  # nccl's collectives run on the current device
    return device


def all_ranks(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Whether `flag` holds on every rank; all ranks get the same answer."""
    if not info.enabled:
        return flag
    t = torch.tensor(float(flag), device=device)  # on the backend's device: nccl reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() == 1.0)


def all_ranks_each(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """For each flag, whether it holds on every rank: all_ranks for several flags in one collective."""
    if not info.enabled:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v == 1.0) for v in t.tolist()]


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Average the .grad of parameters that are not under DistributedDataParallel (critic, learned logvar)."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def cpu_count() -> int:
    """The CPUs this process may run on: its affinity where the OS tells it (containers, taskset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def usable_workers(requested: int) -> int:
    """`requested` DataLoader workers, cut with a warning to WORKERS_PER_CPU per CPU: each worker is a process with
    a copy of the dataset, so thousands of them (a typo) fill the memory until the OOM killer ends the job."""
    cpus = cpu_count()
    most = WORKERS_PER_CPU * cpus
    if requested <= most:
        return requested
    log.warning("%d data-loading workers asked for, more than this machine's %d CPUs can use: running %d",
                requested, cpus, most)
    return most


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def quiet_on_sigterm(worker_id: int) -> None:
    """DataLoader worker_init_fn: a SIGTERM to the job's process group ends a worker as a Ctrl-C does (torch's
    worker loop exits quietly on KeyboardInterrupt), not by the signal, which the main process would report as a
    traceback ("DataLoader worker ... is killed by signal: Terminated") after its own one-line exit."""
    signal.signal(signal.SIGTERM, _interrupt)


@contextlib.contextmanager
def job_lock(folder: Path, job: str, info: DistInfo, device: torch.device) -> Iterator[None]:
    """Rank 0 holds `folder`'s lock (atomic.folder_lock; the folder must exist there) while the block runs; when
    another `job` holds it, every rank stops before touching anything (its other ranks would otherwise write over
    the running job's files of the same rank numbers)."""
    with contextlib.ExitStack() as stack:
        refused: KlvaeError | None = None
        if info.is_main:
            try:
                stack.enter_context(folder_lock(folder, job))
            except KlvaeError as e:
                refused = e
        if not all_ranks(refused is None, info, device):
            raise refused or held_by_another(folder, job)
        yield
