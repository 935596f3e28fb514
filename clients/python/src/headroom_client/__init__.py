"""Ask a headroom service for the largest training batch a GPU holds, and a safe one.

- :class:`Headroom`: the HTTP client (``POST /tune``, ``POST /estimate``, jobs, devices).
- :func:`job_from_torch`: a ``torch.nn.Sequential`` as a headroom job (needs ``torch``).
- :class:`HeadroomBatchSize`: a Lightning callback that sets the batch size from the service
  (needs ``lightning``); :func:`find_executable_batch_size` does the same for Accelerate.

The PyTorch, Lightning and Accelerate parts load those libraries only when first used.
"""

from typing import TYPE_CHECKING, Any

from headroom_client.client import Headroom, HeadroomError, TuneAnswer

if TYPE_CHECKING:
    from headroom_client.accelerate import find_executable_batch_size
    from headroom_client.lightning import HeadroomBatchSize
    from headroom_client.model import job_from_torch

__all__ = [
    "Headroom",
    "HeadroomBatchSize",
    "HeadroomError",
    "TuneAnswer",
    "find_executable_batch_size",
    "job_from_torch",
]

_LAZY = {
    "job_from_torch": "headroom_client.model",
    "HeadroomBatchSize": "headroom_client.lightning",
    "find_executable_batch_size": "headroom_client.accelerate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'headroom_client' has no attribute {name!r}")
