"""Accelerate's ``find_executable_batch_size``, started from headroom's answer instead of a
guess: it shrinks from there (as Accelerate does) only if the step still runs out of memory."""

from __future__ import annotations

from collections.abc import Callable
import warnings
from typing import Any, Literal, TypeVar

from accelerate.utils import find_executable_batch_size as _find_executable_batch_size

from headroom_client.client import Headroom, HeadroomError

Result = TypeVar("Result")


def find_executable_batch_size(
    function: Callable[..., Result],
    *,
    job: dict[str, Any],
    url: str,
    token: str | None = None,
    use: Literal["recommended", "knee"] = "recommended",
    fallback: int = 128,
    gpu_uuid: str | None = None,
) -> Callable[..., Result]:
    """``function`` (whose first argument is the batch size) wrapped as Accelerate wraps it,
    starting from headroom's recommended batch (or the throughput knee) for ``job``; from
    ``fallback`` when the service cannot answer, with a warning that says why."""
    try:
        with Headroom(url, token) as client:
            answer = client.tune(job, gpu_uuid=gpu_uuid)
        start = answer.recommended_batch_size
        if use == "knee" and answer.throughput_batch_size:
            start = answer.throughput_batch_size
    except HeadroomError as error:
        warnings.warn(
            f"headroom did not answer ({error}); starting from fallback={fallback}", stacklevel=2
        )
        start = fallback
    wrapped: Callable[..., Result] = _find_executable_batch_size(
        function, starting_batch_size=start
    )
    return wrapped
