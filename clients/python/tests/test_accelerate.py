"""Accelerate's executable-batch-size search, started from headroom's answer."""

from __future__ import annotations

import pytest
from conftest import mlp_job
from headroom_client import Headroom, find_executable_batch_size


def test_the_search_starts_from_the_recommended_batch_and_shrinks_on_oom(server: str) -> None:
    tried: list[int] = []

    def train(batch_size: int) -> int:
        tried.append(batch_size)
        if batch_size > 100:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return batch_size

    job = mlp_job(40)
    with Headroom(server) as client:
        recommended = client.tune(job).recommended_batch_size
    assert recommended > 100
    ran = find_executable_batch_size(train, job=job, url=server)()
    assert tried[0] == recommended
    assert all(b < a for a, b in zip(tried, tried[1:])), tried
    assert ran == tried[-1] <= 100


def test_a_service_that_is_down_starts_from_the_fallback() -> None:
    tried: list[int] = []

    def train(batch_size: int) -> None:
        tried.append(batch_size)

    with pytest.warns(UserWarning, match="headroom did not answer .*; starting from fallback=64"):
        wrapped = find_executable_batch_size(train, job=mlp_job(8), url="http://127.0.0.1:9", fallback=64)
    wrapped()
    assert tried == [64]
