"""Several processes, one job: the helpers for `torchrun` runs.

Under `torchrun --nproc_per_node=N wss run ...` every process runs the same command. Training
is data-parallel (DistributedDataParallel, stages/common/training.py); per-image inference
writes its share of the images (`shard`); rank 0 alone owns the artifact cache, the logs and
the metrics, which it computes from the files every rank wrote and hands to the others.
Without torchrun (WORLD_SIZE unset or 1) every helper is a no-op and nothing is initialised.
"""

from __future__ import annotations

import datetime
import os
import socket
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

# Rank 0 may score a whole split while the others wait at a barrier: far longer than the
# default collective timeout.
BARRIER_TIMEOUT = datetime.timedelta(hours=6)


def init_from_env(device_name: str) -> None:
    """Join the process group torchrun describes (NCCL on GPUs, Gloo on CPUs); once per process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:
            from data.errors import WssError

            raise WssError(
                f"torchrun started process {local_rank} on this machine but it has {gpus} GPU(s): "
                f"use --nproc_per_node={gpus} (or run.device=cpu)"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=BARRIER_TIMEOUT)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """This process's GPU (LOCAL_RANK) when the run is on CUDA; the device unchanged otherwise."""
    if device.type == "cuda" and active():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def shard(items: list) -> list:
    """This rank's share of a list: every world_size-th item from its rank on."""
    return list(items)[rank() :: world_size()]


def broadcast(value=None):
    """Rank 0's `value`, on every rank (a picklable object)."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not active():
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def all_ranks_list(items: list) -> list:
    """The concatenation of every rank's list (failures, ids written...)."""
    return [item for part in gather(items) for item in part]


def check_shared_folder(folder: Path) -> None:
    """Stop every rank with one line unless each sees `folder` as rank 0 made it. Every rank
    writes its share of the per-image files into rank 0's artifact folder, which rank 0 scores
    and commits: on nodes that do not share run.workdir the other nodes' files would land in
    folders of their own, and rank 0 would commit an artifact holding only its share."""
    if not active():
        return
    token = Path(folder) / f".rank0-{uuid.uuid4().hex}"
    if is_main():
        token.write_text(socket.gethostname())
    token = broadcast(token)  # the others look only once rank 0 has written it
    seen = gather((socket.gethostname(), token.is_file()))
    if is_main():
        token.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, (host, found) in enumerate(seen) if not found]
    if blind:
        from data.errors import WssError

        raise WssError(
            f"run.workdir is not shared by every process: {', '.join(blind)} cannot see {folder}, "
            f"which rank 0 on {seen[0][0]} created; put run.workdir on a file system every node "
            f"mounts at the same path (see docs/distributed.md)"
        )


@torch.no_grad()
def sync_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's module, in place."""
    if not active():
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


def mean_over_ranks(values: dict, device: torch.device) -> dict:
    """{name: number}, each averaged over the ranks (floats; unchanged in one process)."""
    if not active():
        return values
    names = sorted(values)
    stacked = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return dict(zip(names, (stacked / world_size()).tolist()))


def finish() -> None:
    """Wait for every rank, then leave the process group (a rank that exits while another
    still holds the group open can abort in the group's destructor)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()
