"""Fixtures of the SDK suite: the two official clients pointed at the gateway,
each with a recorder of what it sent, and the fleet of simulated instances
whose journals and faults are reset before every test."""

from __future__ import annotations

from typing import Any, Iterator
from urllib.parse import urlsplit

import openai
import pytest

from harness import API_VERSION, Fleet, Recorder, Settings, Sim, header, header_names

# Tests share the instances, so a retry budget or a fault must never leak from
# one test into the next: every client is built per test.


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def _fleet(settings: Settings) -> Iterator[Fleet]:
    sims = [Sim(i, url, settings.sim_key) for i, url in enumerate(settings.sim_urls)]
    yield Fleet(sims)
    for s in sims:
        s.close()


@pytest.fixture
def fleet(_fleet: Fleet) -> Iterator[Fleet]:
    _fleet.reset()
    yield _fleet
    for s in _fleet.sims:
        s.clear_faults()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def make_azure(settings: Settings, recorder: Recorder, **kwargs: Any) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=settings.gateway_url,
        api_key=settings.client_key,
        api_version=API_VERSION,
        http_client=recorder.http_client(),
        timeout=20.0,
        **kwargs,
    )


def make_v1(settings: Settings, recorder: Recorder, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=settings.gateway_url + "/openai/v1/",
        api_key=settings.client_key,
        http_client=recorder.http_client(),
        timeout=20.0,
        **kwargs,
    )


@pytest.fixture
def azure(settings: Settings, recorder: Recorder) -> Iterator[openai.AzureOpenAI]:
    c = make_azure(settings, recorder, max_retries=0)
    yield c
    c.close()


@pytest.fixture
def v1(settings: Settings, recorder: Recorder) -> Iterator[openai.OpenAI]:
    c = make_v1(settings, recorder, max_retries=0)
    yield c
    c.close()


@pytest.fixture(params=["azure", "v1"])
def client(request: pytest.FixtureRequest, settings: Settings, recorder: Recorder) -> Iterator[openai.OpenAI]:
    """Both official clients: ``AzureOpenAI`` on the dated surface and
    ``OpenAI`` on Azure's v1 surface. Retries are off so that every request
    the instances saw is one the test sent."""
    c = (make_azure if request.param == "azure" else make_v1)(settings, recorder, max_retries=0)
    yield c
    c.close()


# --------------------------------------------------------------------------
# Assertions on what the instances received
# --------------------------------------------------------------------------


def assert_forwarded_once(
    settings: Settings,
    fleet: Fleet,
    sent: Any,
    *,
    deployment: str | None = None,
    status: int | None = 200,
) -> tuple[int, dict[str, Any]]:
    """Exactly one instance received ``sent``: same method, path, query and
    body bytes, with the backend's own key (masked in the journal) and nothing
    of the client's credential. ``status=None`` accepts any 2xx. Returns
    (instance index, journal entry)."""
    fleet.wait_settled()
    hits = fleet.entries(lambda e: e["method"] == sent.method and e["path"] == sent.path)
    assert len(hits) == 1, (
        f"expected exactly one instance to receive {sent.method} {sent.path}, got "
        f"{[(i, e['status']) for i, e in hits]}"
    )
    idx, e = hits[0]
    assert (e["query"] or "") == sent.query, "query string must pass through untouched"
    assert e["body_len"] == len(sent.body)
    assert e["body_sha256"] == sent.sha256, "body bytes must reach the instance unchanged"
    if status is None:
        assert 200 <= e["status"] < 300, e["status"]
    else:
        assert e["status"] == status
    if deployment is not None:
        assert e["deployment"] == deployment
    assert_backend_credentials(settings, e)
    # Host names the instance, not the gateway; the SDK's own headers pass
    # through; hop-by-hop headers do not (RFC 9110 section 7.6.1).
    assert header(e, "host") == urlsplit(settings.sim_urls[idx]).netloc
    assert header(e, "user-agent") == sent.headers.get("user-agent")
    assert header(e, "x-stainless-retry-count") == sent.headers.get("x-stainless-retry-count")
    if settings.through_gateway:
        assert "connection" not in header_names(e)
    return idx, e


def assert_backend_credentials(settings: Settings, e: dict[str, Any]) -> None:
    names = header_names(e)
    creds = names & {"api-key", "authorization"}
    assert len(creds) == 1, f"exactly one credential header must reach the instance, got {sorted(creds)}"
    value = header(e, creds.pop()) or ""
    assert value in ("***", "Bearer ***"), "the journal masks credentials"
    # The instances accept only their own key, so a 2xx from one proves the
    # gateway swapped the client's credential for the backend's; this catches
    # the client key travelling in any other header.
    for k, v in e["headers"]:
        assert settings.client_key not in v, f"client key leaked to the backend in header {k}"
