"""Device strings, AMP flags and the single-process path of core.distributed: what runs on a CPU-only machine
of the code that a GPU or a torchrun job takes."""

from __future__ import annotations

import pytest
import torch

from defectkit.core.distributed import Dist, process_group, unwrap


def test_amp_is_on_for_cuda_devices_only():
    from defectkit.core.training import amp_enabled

    assert amp_enabled("cuda") and amp_enabled("cuda:1")
    assert not amp_enabled("cpu") and not amp_enabled("mps")


def test_default_devices_follow_what_the_machine_has(monkeypatch):
    from defectkit.core.training import resolve_device

    def yolo(a):
        return resolve_device(a, "ultralytics")

    assert resolve_device("cuda:1") == "cuda:1" and yolo("0,1") == "0,1"  # an explicit device is kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu" and yolo(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda" and yolo(None) == "0"  # Ultralytics' name for the first GPU


@pytest.mark.parametrize(("n", "world"), [(10, 2), (10, 3), (7, 4), (3, 1)])
def test_shard_deals_samples_as_distributed_sampler_does(n, world):
    from torch.utils.data import DistributedSampler

    for rank in range(world):
        theirs = list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False, drop_last=True))
        assert Dist(rank, world).shard(range(n)) == theirs


def test_outside_torchrun_everything_is_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with process_group("cpu") as d:
        assert (d.rank, d.world, d.is_main, d.active) == (0, 1, True, False)
        assert d.wrap(m) is m and unwrap(m) is m  # no DDP, BatchNorm untouched
        assert isinstance(m[1], torch.nn.BatchNorm2d)
        assert d.broadcast({"val": 0.5}) == {"val": 0.5} and d.shard([3, 1, 2]) == [3, 1, 2]
        d.barrier()
        assert not torch.distributed.is_initialized()
