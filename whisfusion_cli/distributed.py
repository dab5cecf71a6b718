"""Where a process runs and how ranks talk: the rank's device, the precision that device runs natively, the
process group, and every collective (with its tensors placed where the backend needs them).

Launchers (`torchrun`, SLURM's srun through torchrun) describe a run in the environment: WORLD_SIZE, RANK,
LOCAL_RANK and LOCAL_WORLD_SIZE. Each rank takes `cuda:LOCAL_RANK`; NCCL reduces only tensors on that GPU,
gloo only tensors on the CPU, so the collectives here move their tensors to `Group.collective_device` and no
caller has to know which backend runs. Work done by rank 0 alone (evaluation, saving, writing an index)
goes through `Group.on_main`, so an error there reaches every rank instead of leaving the others waiting in
a collective, and the group's timeout is long enough for that work.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from . import first_line

if TYPE_CHECKING:
    import torch

# Collectives wait this long for a slow rank (rank 0 evaluating or saving, a rank with long shards); a rank
# that dies is caught sooner by the launcher, which stops the others.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)
# Compute capability from which bf16 runs natively (Ampere); older GPUs emulate it, slowly.
NATIVE_BF16_CAPABILITY = (8, 0)
# ... and from which TF32 tensor cores exist.
TF32_CAPABILITY = (8, 0)


class DistributedError(RuntimeError):
    """A run that cannot go on because of another rank or the launcher's settings; one line."""


class DeviceMemoryError(RuntimeError):
    """Not even one item of a batch fits in the device's memory; one line."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch, from the launcher's environment (one process when unset)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls, env=None) -> "Ranks":
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", 1))
        return cls(rank=int(env.get("RANK", 0)), world=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_world=int(env.get("LOCAL_WORLD_SIZE", world)))


# ------------------------------------------------------------------------------------------- devices


def rank_device(option: str | None, ranks: Ranks | None = None) -> "torch.device":
    """The device this rank runs on. None/"auto": cuda:LOCAL_RANK where CUDA is available, else cpu; "cuda":
    cuda:LOCAL_RANK; "cuda:N": that GPU, which only one process per node can share; "cpu". A one-line
    ValueError for a device that is not there or that would put several ranks on one GPU."""
    import torch

    ranks = ranks or Ranks.from_env()
    name = (option or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise ValueError(f"unknown device {option!r}; choose from auto, cpu, cuda, cuda:N")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {option!r}; choose from auto, cpu, cuda, cuda:N") from None
    if not torch.cuda.is_available():
        raise ValueError(f"--device {option}: no CUDA GPU is available to torch; use --device cpu")
    if device.index is None:
        device = torch.device("cuda", ranks.local_rank)
    elif ranks.local_world > 1:
        raise ValueError(f"--device {option} with {ranks.local_world} processes per node would put every rank on "
                         f"one GPU; pass --device cuda (rank r takes cuda:LOCAL_RANK) and pick the GPUs with "
                         f"CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    if device.index >= count:
        raise ValueError(f"{device}: only {count} GPU(s) visible to this process (LOCAL_RANK {ranks.local_rank}); "
                         f"start at most {count} processes per node or check CUDA_VISIBLE_DEVICES")
    return device


def native_bf16(device: "torch.device") -> bool:
    """bf16 runs natively on this device: the GPU's own compute capability (Ampere and later), not
    torch.cuda.is_bf16_supported(), which also counts emulation and asks the current device."""
    import torch

    if device.type != "cuda":
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= NATIVE_BF16_CAPABILITY


def half_dtype(device: "torch.device") -> "torch.dtype":
    """The 16-bit float a GPU runs natively: bfloat16 from Ampere on, float16 before (T4, V100)."""
    import torch

    return torch.bfloat16 if native_bf16(device) else torch.float16


def enable_tf32(device: "torch.device") -> bool:
    """Let float32 matrix products use TF32 tensor cores on this GPU (training; ~8x faster products at
    bf16-like mantissa, the accuracy mixed precision already accepts). Returns whether it applies."""
    import torch

    if device.type != "cuda" or tuple(torch.cuda.get_device_capability(device)) < TF32_CAPABILITY:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def synchronize(device: "torch.device | str") -> None:
    """Wait for the work queued on this device (the device named, not the current one)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ the group


class Group:
    """The ranks of this run and the collectives between them; with one process every call is local."""

    def __init__(self, ranks: Ranks, device: "torch.device", backend: str | None = None, own: bool = False):
        self.rank, self.world, self.local_rank = ranks.rank, ranks.world, ranks.local_rank
        self.device, self.backend, self.own = device, backend, own

    @classmethod
    def start(cls, device_option: str | None = None, ranks: Ranks | None = None) -> "Group":
        """Resolve this rank's device, make it the current CUDA device, and join the launcher's process group
        (NCCL on GPUs, gloo on CPUs) unless one exists already."""
        import torch

        ranks = ranks or Ranks.from_env()
        device = rank_device(device_option, ranks)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if ranks.world == 1:
            return cls(ranks, device)
        import torch.distributed as dist

        if dist.is_initialized():
            return cls(ranks, device, dist.get_backend())
        backend = "nccl" if device.type == "cuda" else "gloo"
        extra = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **extra)
        return cls(ranks, device, backend, own=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collective_device(self) -> "torch.device":
        """Where the backend takes tensors: the rank's GPU for NCCL, the CPU for gloo."""
        import torch

        return self.device if self.backend == "nccl" else torch.device("cpu")

    def data_parallel(self, module: "torch.nn.Module") -> "torch.nn.Module":
        """`module` as DDP over this group (gradients averaged over ranks in backward); with one rank, itself.
        A collective: every rank must reach it."""
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def sum(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """The element-wise sum over ranks of `tensor` (a new tensor on the collective device)."""
        t = tensor.detach().to(self.collective_device, copy=True)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop decided from each rank's own clock)."""
        if self.world == 1:
            return bool(flag)
        import torch

        return bool(self.sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value (picklable) on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.collective_device)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every rank's value (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def check(self, error: str | None, error_type: type = DistributedError) -> None:
        """Every rank passes its own error (or None); if any rank has one, every rank raises it (as
        error_type, the message prefixed with the failing rank on the others)."""
        errors = [(r, e) for r, e in enumerate(self.gather(error)) if e]
        if errors:
            rank, message = errors[0]
            raise error_type(message if rank == self.rank else f"rank {rank}: {message}")

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() run by rank 0 alone; its result on every rank. An exception in fn is raised on rank 0 as it is
        and on every other rank as a DistributedError with the same line, so no rank is left waiting."""
        if self.world == 1:
            return fn()
        result, error, exc = None, None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # sent to the other ranks first, then raised here unchanged
                error, exc = first_line(e, limit=None), e
        result, error = self.broadcast((result, error))
        if exc is not None:
            raise exc
        if error is not None:
            raise DistributedError(f"rank 0: {error}")
        return result

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        """Tear down a process group this Group started (exiting with gloo's threads alive can abort a rank
        after a good run); a group the caller started stays."""
        if self.own:
            import gc

            import torch.distributed as dist

            # A finished run's DDP wrapper is still alive here, in reference cycles that hold the process group
            # (checked: one per rank); collected at interpreter exit instead, gloo's threads die with it and can
            # abort the rank ("terminate called without an active exception", once in CI after a good run).
            gc.collect()
            if dist.is_initialized():
                dist.destroy_process_group()
            self.own = False


# ------------------------------------------------------------------------------------ out of memory


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure of the device (torch.OutOfMemoryError, or the RuntimeError of older kernels).
    Without torch imported no torch error can have been raised, so torch is not imported to ask."""
    torch = sys.modules.get("torch")
    return (torch is not None and isinstance(e, torch.OutOfMemoryError)) or \
        (isinstance(e, RuntimeError) and "out of memory" in str(e))


def in_halves_on_oom(fn: Callable[[list], list], items: list, what: str = "batch") -> list:
    """fn(items), a list with one entry per item; when the device runs out of memory, the cache is freed and
    each half of items is retried the same way, so a batch too big for the GPU still finishes (and a rerun
    does not fail on the same batch). Only a single item that does not fit is an error (one line)."""
    try:
        return fn(items)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        error = first_line(e, limit=200)
    import torch  # only here: a run that never runs out of memory (the CPU engine) needs no torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(items) == 1:
        raise DeviceMemoryError(f"out of device memory on a single {what} ({error}); lower the candidates or the "
                          f"canvas length, or run on a device with more memory") from None
    half = (len(items) + 1) // 2
    return in_halves_on_oom(fn, items[:half], what) + in_halves_on_oom(fn, items[half:], what)
