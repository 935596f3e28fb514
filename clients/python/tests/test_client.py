"""The client against a real server: answers, jobs followed to their end, problems, a busy
service's Retry-After, a service that is down."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import mlp_job
from headroom_client import Headroom, HeadroomError, TuneAnswer


def test_a_tune_answers_and_a_second_is_cached(server: str) -> None:
    with Headroom(server) as client:
        first = client.tune(mlp_job(8))
        assert first.max_batch_size > 0
        assert first.recommended_batch_size <= first.max_batch_size
        assert not first.cached
        again = client.tune(mlp_job(8))
        assert again.cached and again.max_batch_size == first.max_batch_size


def test_an_async_job_is_followed_to_its_answer(server: str) -> None:
    job = mlp_job(24, "adam")
    job["search"] = {"steps_per_probe": 20, "max": 65536}
    with Headroom(server) as client:
        submitted = client.tune(job, wait=False, no_cache=True)
        assert isinstance(submitted, dict), submitted
        assert submitted["state"] in ("queued", "running")
        document = client.job(submitted["id"])
        assert document["id"] == submitted["id"]
        # wait_seconds is 1 on this server: a synchronous request turns into a followed job.
        answer = client.tune(job, no_cache=True)
        assert isinstance(answer, TuneAnswer) and answer.max_batch_size > 0
        assert client.job(submitted["id"])["state"] == "succeeded"


def test_problems_are_raised_with_their_fields(server: str) -> None:
    with Headroom(server) as client:
        with pytest.raises(HeadroomError) as refused:
            client.tune({"model": {"input_shape": [0], "num_classes": 2}, "optimizer": {"name": "sgd"}})
        assert refused.value.status == 422
        assert refused.value.field == "model.input_shape[0]"
        with pytest.raises(HeadroomError) as missing:
            client.job("8f8e2f9e-2a57-4a39-9a87-2f43c5c0a6d1")
        assert missing.value.status == 404
        with pytest.raises(HeadroomError) as unknown:
            client.estimate(mlp_job(8), gpu="TPU")
        assert unknown.value.status == 422 and "T4" in unknown.value.detail


def test_estimate_and_devices(server: str) -> None:
    with Headroom(server) as client:
        estimate = client.estimate(mlp_job(8), gpu="H100 80GB")
        assert estimate["estimates"][0]["gpu"] == "H100 80GB"
        assert estimate["estimates"][0]["estimate"]["predicted_max_batch_size"] > 0
        by_memory = client.estimate(mlp_job(8), memory_bytes=1 << 30)
        assert by_memory["estimates"][0]["estimate"]["memory_bytes"] > 0
        devices = client.devices()
        assert [d["device"] for d in devices] == ["host"]


def test_a_service_that_is_down_is_an_error() -> None:
    with Headroom("http://127.0.0.1:9") as client:
        with pytest.raises(HeadroomError) as down:
            client.tune(mlp_job(8))
    assert down.value.status is None and "cannot reach" in str(down.value)


@pytest.fixture
def busy_then_ready() -> Iterator[tuple[str, list[float]]]:
    """A server that answers 503 with Retry-After: 1 twice, then an answer; the times it was
    asked."""
    asked: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            asked.append(time.monotonic())
            if len(asked) <= 2:
                body = {"type": "about:blank", "title": "Service Unavailable", "status": 503,
                        "detail": "queue full"}
                self.send_response(503)
                self.send_header("Retry-After", "1")
                self.send_header("Content-Type", "application/problem+json")
            else:
                body = {"max_batch_size": 64, "recommended_batch_size": 48}
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
            data = json.dumps(body).encode()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", asked
    httpd.shutdown()


def test_a_busy_service_is_asked_again_after_its_retry_after(
    busy_then_ready: tuple[str, list[float]],
) -> None:
    url, asked = busy_then_ready
    with Headroom(url) as client:
        answer = client.tune(mlp_job(8))
    assert answer.recommended_batch_size == 48
    assert len(asked) == 3
    assert all(b - a >= 0.95 for a, b in zip(asked, asked[1:])), asked
    with Headroom(url) as client:
        asked.clear()
        with pytest.raises(HeadroomError) as gave_up:
            client.tune(mlp_job(8), timeout=0.5)
    assert gave_up.value.status == 503 and gave_up.value.retry_after == 1.0
