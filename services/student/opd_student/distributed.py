"""Several trainer processes (torchrun): who this rank is, how the student is wrapped, global sums.

`opd train` under `torchrun --nproc-per-node N [--nnodes M ...]` finds RANK / WORLD_SIZE / LOCAL_RANK in
its environment and joins a process group (gloo on CPU, NCCL on CUDA); without them it is a world of one
and nothing here costs anything. Each rank samples and scores its share of a step's prompts; gradients are
synchronised by the wrapper the config picks:

- `parallel = "ddp"`: DistributedDataParallel. Every rank holds the whole model and optimiser; gradients
  are all-reduced. Fastest for small students.
- `parallel = "fsdp"`: FSDP2, `fully_shard` on every decoder layer and on the root. Parameters, gradients
  and optimiser state are split over the ranks, so students that do not fit one device still train.

Both wrap `CompletionLogprobs` (rollouts.py), the module whose forward is the training forward, because
both hook their gradient synchronisation into the wrapped module's forward.
"""

from __future__ import annotations

import datetime
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from opd_student.rollouts import CompletionLogprobs


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def single_node(self) -> bool:
        return self.local_size == self.size

    def share(self, n: int) -> range:
        """This rank's contiguous share of n items (n is a multiple of the world size: config checks)."""
        per_rank = n // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


SINGLE = World()  # one process, no process group


def world_from_env() -> World:
    """The torchrun environment, or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(
        rank=int(os.environ["RANK"]),
        size=size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(size))),
    )


def opd_command(procs: int = 1, nnodes: int = 1, node_rank: int = 0, port: int | None = None) -> list[str]:
    """The command that runs `opd ...`: plainly for one process, else under torchrun with `procs` ranks per
    node and the rendezvous on loopback (benchmarks and tests; `port` must be shared by all nodes)."""
    if procs == 1 and nnodes == 1:
        return [sys.executable, "-m", "opd_cli.main"]
    from opd_common.launch import free_port

    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
        "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1", "--master-port", str(port or free_port()),
        "-m", "opd_cli.main",
    ]  # fmt: skip


def init_process_group(world: World, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the torchrun process group. CUDA: NCCL for tensors on the GPU, gloo for the CPU-side sums and
    object broadcasts. The timeout is long because a rank can wait for a slow teacher before a collective."""
    if not world.distributed or dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, world: World) -> torch.device:
    """One GPU per local rank; CPU ranks share the host."""
    if device.type == "cuda" and world.distributed:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def wrap_student(lm: torch.nn.Module, parallel: str, world: World) -> torch.nn.Module:
    """The module the trainer runs forwards on: CompletionLogprobs, wrapped for gradient sync."""
    scorer = CompletionLogprobs(lm)
    if not world.distributed:
        return scorer
    if parallel == "ddp":
        device_ids = [lm.device.index] if lm.device.type == "cuda" else None
        return DistributedDataParallel(scorer, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layer_classes = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise SystemExit(
            f"error: parallel = fsdp: cannot find the decoder layers of {type(lm).__name__} "
            "(no _no_split_modules); use --parallel ddp"
        )
    for layer in layers:
        fully_shard(layer)
    fully_shard(scorer)  # the root: embeddings, final norm, lm_head
    # An instance attribute shadowing the method, on purpose (FSDP calls it by name, below).
    scorer.generate = _unsharded_generate(scorer)  # type: ignore[method-assign]
    # generate() is not forward(): have FSDP treat it as one, so the root initialises and gathers its own
    # parameters (embeddings, norm, lm_head) around it as it does around a forward.
    register_fsdp_forward_method(scorer, "generate")
    return scorer


def _unsharded_generate(scorer):
    """generate() with every parameter gathered once for the whole decode.

    Left to FSDP, every generated token would all-gather every layer again, and every rank would have to
    decode in lockstep (each of those gathers is a collective). Sampling needs no gradients, so the
    full weights are gathered once, kept for the decode, and resharded after: for the length of a
    decode a rank holds the whole model, as DDP does all the time.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in scorer.modules() if isinstance(m, FSDPModule) and m is not scorer]
    decode = scorer.generate

    def generate(**kwargs):
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            return decode(**kwargs)
        finally:
            for unit in units:
                unit.set_reshard_after_forward(True, recurse=False)
                unit.reshard()

    return generate


@contextmanager
def gradient_sync(student: torch.nn.Module, enabled: bool):
    """Micro-batches before the last one of a step accumulate locally; the last one synchronises."""
    if isinstance(student, DistributedDataParallel) and not enabled:
        with student.no_sync():
            yield
        return
    set_sync = getattr(student, "set_requires_gradient_sync", None)  # FSDP2
    if set_sync is not None:
        set_sync(enabled)
    yield


def plain_float(value) -> float:
    """A gradient norm as a float (FSDP2 returns a DTensor)."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 split the parameters (DTensors) over the ranks."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def peak_memory_mib(device: torch.device) -> float:
    """This process's high-water mark: the GPU's allocated memory on CUDA, else the resident set (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def state_mib(model: torch.nn.Module, optimizer) -> float:
    """What this rank holds of the training state: parameters + gradients + optimiser state (its shards
    under FSDP2, everything under DDP or in one process)."""
    from torch.distributed.tensor import DTensor

    def nbytes(t: torch.Tensor) -> int:
        return (t.to_local() if isinstance(t, DTensor) else t).nbytes

    total = sum(nbytes(p) + (nbytes(p.grad) if p.grad is not None else 0) for p in model.parameters())
    total += sum(nbytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return total / 2**20
