"""Shared machinery of the SDK suite: where the gateway and the simulated
instances listen, a recorder of exactly what the SDK put on the wire, and
helpers that read each instance's journal.

The suite is started by ``run.sh``, which exports:

* ``AOAI_GATEWAY_URL``  - the gateway's base URL (``http://127.0.0.1:PORT``);
* ``AOAI_CLIENT_KEY``   - the key clients present to the gateway;
* ``AOAI_SIM_URLS``     - comma-separated base URLs of the simulated instances;
* ``AOAI_SIM_KEY``      - the key the simulated instances accept (never the
  client key, so a 200 from an instance proves the gateway injected it);
* ``AOAI_TARGET``       - ``gateway`` (default) or ``sim`` when the suite is
  pointed straight at the first instance while the gateway is unavailable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

import httpx2

API_VERSION = os.environ.get("AOAI_API_VERSION", "2025-04-01-preview")
DEPLOYMENT = os.environ.get("AOAI_DEPLOYMENT", "gpt-4o")
EMBEDDING_DEPLOYMENT = os.environ.get("AOAI_EMBEDDING_DEPLOYMENT", "text-embedding-3-small")


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: start the suite with sdk-tests/run.sh")
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    gateway_url: str
    client_key: str
    sim_urls: tuple[str, ...]
    sim_key: str
    target: str

    @property
    def through_gateway(self) -> bool:
        return self.target == "gateway"

    @classmethod
    def from_env(cls) -> "Settings":
        sims = tuple(u.rstrip("/") for u in _env("AOAI_SIM_URLS").split(",") if u)
        target = os.environ.get("AOAI_TARGET", "gateway")
        if target == "sim":
            return cls(sims[0], _env("AOAI_SIM_KEY"), sims[:1], _env("AOAI_SIM_KEY"), target)
        return cls(
            _env("AOAI_GATEWAY_URL").rstrip("/"),
            _env("AOAI_CLIENT_KEY"),
            sims,
            _env("AOAI_SIM_KEY"),
            target,
        )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# What the client sent and received
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Sent:
    """One request exactly as the SDK put it on the wire, and its answer."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    status: int | None = None
    response_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    response_body: bytearray = dataclasses.field(default_factory=bytearray)
    at: float = 0.0

    @property
    def sha256(self) -> str:
        return sha256_hex(self.body)


class _TeeStream(httpx2.SyncByteStream):
    """Copies a response body into a buffer while the SDK reads it, so a test
    can compare the raw SSE events with what the SDK's iterator yielded."""

    def __init__(self, inner: httpx2.SyncByteStream, sink: bytearray) -> None:
        self._inner = inner
        self._sink = sink

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._sink.extend(chunk)
            yield chunk

    def close(self) -> None:
        self._inner.close()


class _TeeTransport(httpx2.HTTPTransport):
    def __init__(self, recorder: "Recorder", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._recorder = recorder

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = super().handle_request(request)
        sink = self._recorder.sent[-1].response_body if self._recorder.sent else bytearray()
        response.stream = _TeeStream(response.stream, sink)  # type: ignore[arg-type]
        return response


class Recorder:
    """Keeps every request the SDK sends (event hooks) and every response body
    it reads (a tee in the transport).

    Reading the request in the hook materialises multipart bodies too; httpx
    then sends those same bytes, so the SHA-256 taken here is the one the
    server must see.
    """

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def on_request(self, request: httpx2.Request) -> None:
        body = request.read()
        url = urlsplit(str(request.url))
        self.sent.append(
            Sent(
                method=request.method,
                path=url.path,
                query=url.query,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                at=time.monotonic(),
            )
        )

    def on_response(self, response: httpx2.Response) -> None:
        for s in reversed(self.sent):
            if s.status is None:
                s.status = response.status_code
                s.response_headers = {k.lower(): v for k, v in response.headers.items()}
                break

    def http_client(self, **kwargs: Any) -> httpx2.Client:
        import openai

        return openai.DefaultHttpxClient(
            event_hooks={"request": [self.on_request], "response": [self.on_response]},
            transport=_TeeTransport(self),
            **kwargs,
        )

    def clear(self) -> None:
        self.sent.clear()

    def only(self, path_suffix: str, method: str | None = None) -> Sent:
        """The single request whose path ends with ``path_suffix``."""
        hits = [
            s
            for s in self.sent
            if s.path.endswith(path_suffix) and (method is None or s.method == method)
        ]
        assert len(hits) == 1, f"expected one {method or ''} {path_suffix}, client sent {[ (s.method, s.path) for s in self.sent]}"
        return hits[0]

    def last(self) -> Sent:
        assert self.sent, "the client sent nothing"
        return self.sent[-1]


# --------------------------------------------------------------------------
# The simulated instances
# --------------------------------------------------------------------------


class Sim:
    """One simulated Azure OpenAI instance and its admin routes."""

    def __init__(self, index: int, url: str, key: str) -> None:
        self.index = index
        self.url = url
        self.key = key
        self._http = httpx2.Client(base_url=url, timeout=10.0, headers={"api-key": key})

    def __repr__(self) -> str:
        return f"sim[{self.index}]"

    def journal(self) -> list[dict[str, Any]]:
        r = self._http.get("/_sim/journal")
        r.raise_for_status()
        data = r.json()
        entries = data["entries"] if isinstance(data, dict) else data
        # Admin traffic is not what the gateway sent.
        return [e for e in entries if not e["path"].startswith("/_sim/")]

    def clear_journal(self) -> None:
        self._http.delete("/_sim/journal").raise_for_status()

    def inject(self, fault: dict[str, Any]) -> None:
        r = self._http.post("/_sim/faults", content=json.dumps(fault), headers={"content-type": "application/json"})
        assert r.status_code < 300, f"{self} refused fault {fault}: {r.status_code} {r.text}"

    def clear_faults(self) -> None:
        self._http.delete("/_sim/faults").raise_for_status()

    def close(self) -> None:
        self._http.close()


class Fleet:
    """All instances behind the gateway."""

    def __init__(self, sims: Iterable[Sim]) -> None:
        self.sims = list(sims)

    def reset(self) -> None:
        for s in self.sims:
            s.clear_faults()
            s.clear_journal()

    def journals(self) -> dict[int, list[dict[str, Any]]]:
        return {s.index: s.journal() for s in self.sims}

    def entries(self, where: Callable[[dict[str, Any]], bool] = lambda e: True) -> list[tuple[int, dict[str, Any]]]:
        """(instance index, entry) for every journal entry matching ``where``."""
        out = []
        for idx, entries in self.journals().items():
            out.extend((idx, e) for e in entries if where(e))
        return out

    def wait_settled(self, timeout: float = 5.0) -> None:
        """Wait until no journal entry is still in flight (streams end a bit
        after the client has read the last byte)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(e.get("outcome") == "in_flight" for _, e in self.entries()):
                return
            time.sleep(0.02)


def header(entry: dict[str, Any], name: str) -> str | None:
    for k, v in entry["headers"]:
        if k.lower() == name:
            return v
    return None


def header_names(entry: dict[str, Any]) -> set[str]:
    return {k.lower() for k, _ in entry["headers"]}
