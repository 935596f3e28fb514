"""The HTTP client: one method per route, problems raised as :class:`HeadroomError`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import httpx

Json = dict[str, Any]

#: States after which a job changes no more.
FINISHED = frozenset({"succeeded", "failed", "cancelled", "interrupted"})
#: Statuses a busy service answers with ``Retry-After``: tried again until the deadline.
RETRIED = frozenset({429, 503})


class HeadroomError(Exception):
    """What the service refused or could not do, with its problem document's fields (RFC 9457),
    or why it could not be reached (``status`` is then ``None``)."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        type: str | None = None,
        field: str | None = None,
        retry_after: float | None = None,
        problem: Json | None = None,
    ) -> None:
        super().__init__(f"{title}: {detail}" if title else detail)
        self.detail = detail
        self.status = status
        self.title = title
        self.type = type
        self.field = field
        self.retry_after = retry_after
        self.problem = problem or {}

    @classmethod
    def from_problem(cls, problem: Json, retry_after: float | None = None) -> HeadroomError:
        """The error a problem document describes."""
        return cls(
            str(problem.get("detail", "the service gave no detail")),
            status=problem.get("status"),
            title=problem.get("title"),
            type=problem.get("type"),
            field=problem.get("field"),
            retry_after=retry_after,
            problem=problem,
        )

    @classmethod
    def from_response(cls, response: httpx.Response) -> HeadroomError:
        """The error of a 4xx or 5xx answer."""
        retry_after = _retry_after(response)
        try:
            problem = response.json()
        except ValueError:
            problem = None
        if isinstance(problem, dict):
            problem.setdefault("status", response.status_code)
            return cls.from_problem(problem, retry_after)
        return cls(
            response.text or response.reason_phrase,
            status=response.status_code,
            title=response.reason_phrase,
            retry_after=retry_after,
        )


@dataclass(frozen=True)
class TuneAnswer:
    """headroom's answer: the largest batch that ran a training step, the recommended one,
    the throughput knee, and the accumulation advice for a target global batch."""

    max_batch_size: int
    recommended_batch_size: int
    throughput_batch_size: int | None
    accumulation: Json | None
    cached: bool
    raw: Json = field(repr=False)

    @classmethod
    def from_json(cls, answer: Json) -> TuneAnswer:
        return cls(
            max_batch_size=int(answer["max_batch_size"]),
            recommended_batch_size=int(answer["recommended_batch_size"]),
            throughput_batch_size=answer.get("throughput_batch_size"),
            accumulation=answer.get("accumulation"),
            cached=bool(answer.get("cached", False)),
            raw=answer,
        )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Headroom:
    """A headroom service at ``url``; ``token`` when it asks for one (``token`` in its config).

    Every method raises :class:`HeadroomError` for an answer the service refused (its problem
    document's fields on the exception) and for a service that cannot be reached.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        token: str | None = None,
        *,
        request_timeout: float = 90.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=request_timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Headroom:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @overload
    def tune(
        self,
        job: Json,
        *,
        device: str | None = ...,
        gpu_uuid: str | None = ...,
        no_cache: bool = ...,
        allow_shared: bool = ...,
        wait: Literal[True] = ...,
        timeout: float = ...,
    ) -> TuneAnswer: ...

    @overload
    def tune(
        self,
        job: Json,
        *,
        device: str | None = ...,
        gpu_uuid: str | None = ...,
        no_cache: bool = ...,
        allow_shared: bool = ...,
        wait: Literal[False],
        timeout: float = ...,
    ) -> TuneAnswer | Json: ...

    def tune(
        self,
        job: Json,
        *,
        device: str | None = None,
        gpu_uuid: str | None = None,
        no_cache: bool = False,
        allow_shared: bool = False,
        wait: bool = True,
        timeout: float = 3600.0,
    ) -> TuneAnswer | Json:
        """Tunes ``job`` (a dict as in headroom's ``examples/``) on ``device`` (``auto``,
        ``host``, ``cuda:N``) or the GPU ``gpu_uuid``.

        With ``wait`` the job is followed to its answer, honouring ``Retry-After`` (a busy
        queue, a running job), for at most ``timeout`` seconds. Without it, the job is
        submitted and its document returned (``id``, ``state``), unless the answer is cached.
        """
        body = dict(job)
        for name, value in (("device", device), ("gpu_uuid", gpu_uuid)):
            if value is not None:
                body[name] = value
        if no_cache:
            body["no_cache"] = True
        if allow_shared:
            body["allow_shared"] = True
        deadline = time.monotonic() + timeout
        # Waiting, the request waits on the server (up to its `wait_seconds`) and is then
        # followed; otherwise the server answers at once.
        headers = {} if wait else {"Prefer": "respond-async"}
        response = self._send("POST", "/tune", deadline, json=body, headers=headers)
        if response.status_code == 200:
            return TuneAnswer.from_json(response.json())
        document: Json = response.json()
        if not wait:
            return document
        return self._follow(document["id"], deadline)

    def estimate(
        self, job: Json, *, gpu: str | None = None, memory_bytes: int | None = None
    ) -> Json:
        """The memory model's answer for ``job`` on a catalogue ``gpu`` (``"H100 80GB"``) or a
        card of ``memory_bytes``; no device is touched."""
        body = dict(job)
        if gpu is not None:
            body["gpu"] = gpu
        if memory_bytes is not None:
            body["memory_bytes"] = memory_bytes
        answer: Json = self._send("POST", "/estimate", time.monotonic(), json=body).json()
        return answer

    def job(self, id: str) -> Json:
        """A job's document: its state, probes so far, result or error."""
        document: Json = self._send("GET", f"/jobs/{id}", time.monotonic()).json()
        return document

    def devices(self) -> list[Json]:
        """Every device the service serves, with NVML's telemetry for GPUs."""
        devices: list[Json] = self._send("GET", "/devices", time.monotonic()).json()
        return devices

    def _follow(self, id: str, deadline: float) -> TuneAnswer:
        while True:
            response = self._send("GET", f"/jobs/{id}", deadline)
            document = response.json()
            state = document.get("state")
            if state == "succeeded":
                return TuneAnswer.from_json(document["result"])
            if state in FINISHED:
                problem = document.get("error") or {"detail": f"the job ended {state}"}
                raise HeadroomError.from_problem(problem)
            self._pause(_retry_after(response) or 1.0, deadline, f"job {id} is still {state}")

    def _send(self, method: str, path: str, deadline: float, **kwargs: Any) -> httpx.Response:
        """One request, tried again while the service says it is busy (429, 503 with
        ``Retry-After``) and ``deadline`` allows."""
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.HTTPError as failure:
                raise HeadroomError(f"cannot reach headroom at {self.url}: {failure}") from failure
            if response.status_code < 400:
                return response
            error = HeadroomError.from_response(response)
            if response.status_code not in RETRIED or error.retry_after is None:
                raise error
            self._pause(error.retry_after, deadline, error.detail, error)

    @staticmethod
    def _pause(
        seconds: float, deadline: float, what: str, error: HeadroomError | None = None
    ) -> None:
        if time.monotonic() + seconds > deadline:
            raise error or HeadroomError(f"gave up waiting: {what}")
        time.sleep(seconds)
