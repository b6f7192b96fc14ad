"""torch.distributed for dfq: ``torchrun --nproc_per_node N -m dfq.cli ...`` runs data-parallel.

What is distributed (see README "Several processes or nodes"):

* BN-inversion synthesis: batch ``k`` runs on rank ``k % N`` (each batch is seeded by its index,
  so the gathered set equals the single-process one), then every rank holds all images.
* Fine-tuning: the student (and the generator) are wrapped in ``DistributedDataParallel``; each
  rank draws its own noise/labels (seeds offset by rank), so the global batch is ``N x batch``;
  BN statistics of synthetic features are all-reduced (differentiably) before they are compared
  with the running statistics, so BNS losses see the global batch; ClusterQ's class sums and
  counts are all-reduced before the EMA centroid update; DDAQ's discriminators get their
  gradients averaged. Parameters stay identical on every rank.
* Rank 0 alone writes checkpoints, the ONNX files and the report; every rank reads the
  checkpoint on ``--resume``. The other ranks stop after fine-tuning.

Backend: ``gloo``, also on machines with CUDA: every tensor dfq synthesises, fine-tunes or gathers
lives on the CPU, and ``nccl`` moves CUDA tensors only (with it, the first all-gather of CPU images
fails, and two ranks on one GPU are refused). Without torchrun's environment (``WORLD_SIZE`` unset
or 1) nothing here initialises anything and dfq runs single-process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def init_from_env() -> DistInfo:
    """Initialise the default process group from torchrun's environment variables (once)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = "gloo"   # CPU tensors only (module docstring)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, backend=backend)


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=dist.get_backend())
    return SINGLE


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate equally shaped... or unequal first dims of ``t`` from every rank, in rank order."""
    if not info.enabled:
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(info.world)]
    dist.all_gather(sizes, n)
    biggest = int(max(s.item() for s in sizes))
    padded = torch.zeros((biggest, *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(info.world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def global_mean_var(mu: torch.Tensor, var: torch.Tensor, info: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/variance over every rank's (equal-sized) batch from the local ones, with
    gradients flowing back to each rank's features (``torch.distributed.nn`` all-reduce)."""
    if not info.enabled:
        return mu, var
    from torch.distributed.nn.functional import all_reduce

    second = var + mu * mu                       # E[x^2] locally
    m = all_reduce(mu) / info.world
    s2 = all_reduce(second) / info.world
    return m, (s2 - m * m).clamp(min=0)


def average_gradients(params, info: DistInfo) -> None:
    """All-reduce and average ``.grad`` of parameters not handled by DDP (discriminators)."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= info.world


def all_reduce_sum(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Sum each tensor over every rank, in place (a no-op in a single process)."""
    if not info.enabled:
        return
    for t in tensors:
        dist.all_reduce(t)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
