"""A real ``headroom serve`` on loopback for the tests: the binary in ``$HEADROOM_BIN`` (the
Rust test ``tests/python_client.rs`` sets it), on the host device with a small budget and a
store in memory."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[3]


def _binary() -> Path:
    configured = os.environ.get("HEADROOM_BIN")
    binary = Path(configured) if configured else REPOSITORY / "target" / "debug" / "headroom"
    if not binary.is_file():
        pytest.fail(f"no headroom binary at {binary}: build it or set HEADROOM_BIN")
    return binary


@pytest.fixture(scope="session")
def server() -> Iterator[str]:
    """The base URL of a running server."""
    environment = dict(os.environ, HEADROOM_STORE="sqlite::memory:", HEADROOM_WAIT_SECONDS="1")
    process = subprocess.Popen(
        [str(_binary()), "serve", "--device", "host", "--host-memory", "64MiB",
         "--bind", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    assert process.stderr is not None
    address = None
    for line in process.stderr:
        found = re.search(r"address=(\S+)", line)
        if found:
            address = found.group(1)
            break
    if address is None:
        process.kill()
        pytest.fail("the server never said where it listens")
    # Keep reading its log, so that it never blocks on a full pipe.
    threading.Thread(target=process.stderr.read, daemon=True).start()
    try:
        yield f"http://{address}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def mlp_job(width: int, optimizer: str = "sgd") -> dict[str, object]:
    """A small MLP job that tunes in a moment; ``width`` makes jobs distinct."""
    return {
        "model": {"input_shape": [16], "hidden_layers": [width], "num_classes": 4},
        "optimizer": {"name": optimizer},
        "search": {"max": 2048},
    }
