"""torch.distributed for the suite's trainers, the way torchvision's references use it.

    torchrun --nproc_per_node 2 anomaly/train.py ...        # gloo on CPU, NCCL on GPUs
    torchrun --nproc_per_node 4 finetune/sam.py ... --device cuda

:func:`process_group` starts the group when ``torchrun`` set ``WORLD_SIZE`` > 1 and tears it
down on every exit path (an exception included); outside torchrun it is a single process and
every helper is a no-op.  ``--batch`` is per process, as in torchvision's references: the global
batch is ``world * batch``.  Only rank 0 writes (checkpoints, metrics, predictions).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world``, and its device."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files."""
        return self.rank == 0

    def wrap(self, module, find_unused: bool = False):
        """``module`` in DistributedDataParallel, or ``module`` itself in a single process.  On GPUs
        BatchNorm becomes SyncBatchNorm (statistics over the global batch); PyTorch has no CPU
        SyncBatchNorm, so on CPU each process normalises with its own share of the batch."""
        if not self.active:
            return module
        import torch

        ids = None
        if self.device.startswith("cuda"):
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
            ids = [torch.device(self.device).index or 0]
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)

    def shard(self, order: Sequence[int]) -> list[int]:
        """This process's share of a sequence of sample positions, as DistributedSampler deals them
        (``order[rank::world]``, the tail cut so that every process gets as many): with a per-process
        batch ``b``, step ``k`` of all processes together is exactly ``order[k*world*b:(k+1)*world*b]``,
        the single-process step with batch ``world*b``."""
        order = list(order)
        if not self.active:
            return order
        usable = len(order) - len(order) % self.world
        return order[self.rank : usable : self.world]

    def broadcast(self, value):
        """Rank 0's ``value`` on every process (a decision such as early stopping must agree)."""
        if not self.active:
            return value
        import torch

        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch

            torch.distributed.barrier()


def _device_for_rank(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        d = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(d)
        return d
    return device


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Dist]:
    """The job's :class:`Dist`; under ``torchrun`` (``WORLD_SIZE`` > 1) the process group lives
    exactly as long as the ``with`` block: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist(0, 1, device)
        return
    import torch

    backend = "nccl" if device.startswith("cuda") else "gloo"
    torch.distributed.init_process_group(backend)
    try:
        d = Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), _device_for_rank(device))
        log.info("process %d of %d (%s) on %s", d.rank, d.world, backend, d.device)
        yield d
    finally:
        torch.distributed.destroy_process_group()


def unwrap(module):
    """The model inside DistributedDataParallel (what checkpoints hold)."""
    return getattr(module, "module", module)
