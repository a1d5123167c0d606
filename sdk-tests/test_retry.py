"""The SDK's own retry path through the gateway: when every instance is
throttled, the client is told how long to wait (``retry-after-ms``), waits that
long, retries and succeeds."""

from __future__ import annotations

import time

from conftest import assert_backend_credentials, make_azure, make_v1
from harness import DEPLOYMENT

THROTTLE_MS = 600


def _throttle_every_instance(fleet, count: int = 1) -> None:
    for sim in fleet.sims:
        sim.inject({"kind": "fail", "count": count, "status": 429, "retry_after_ms": THROTTLE_MS})


def _run(client_factory, settings, recorder, fleet):
    try:
        _exchange(client_factory, settings, recorder, fleet)
    finally:
        # The gateway keeps throttled instances cooling for THROTTLE_MS; let
        # that pass so the next test starts with every instance available.
        time.sleep(THROTTLE_MS / 1000)


def _exchange(client_factory, settings, recorder, fleet):
    _throttle_every_instance(fleet)
    client = client_factory(settings, recorder, max_retries=2)
    started = time.monotonic()
    with client:
        r = client.chat.completions.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    elapsed = time.monotonic() - started
    assert r.object == "chat.completion"

    attempts = [s for s in recorder.sent if s.path.endswith("/chat/completions")]
    assert len(attempts) >= 2, "the client saw a 429 and retried"
    assert attempts[-1].status == 200
    throttled = attempts[:-1]
    assert all(a.status == 429 for a in throttled)
    total_wait_ms = 0.0
    for a, nxt in zip(throttled, attempts[1:]):
        assert "retry-after" in a.response_headers
        wait_ms = float(a.response_headers["retry-after-ms"])
        # The gateway reports the time until the first instance is free: at
        # most what the instances asked for, and not a token wait either.
        assert THROTTLE_MS / 2 <= wait_ms <= THROTTLE_MS, wait_ms
        # The SDK waited as long as it was told before the next attempt.
        assert nxt.at - a.at >= wait_ms / 1000
        total_wait_ms += wait_ms
    assert attempts[-1].headers.get("x-stainless-retry-count") == str(len(throttled))
    assert elapsed >= total_wait_ms / 1000

    fleet.wait_settled()
    hits = fleet.entries(lambda e: e["path"] == attempts[-1].path)
    statuses = sorted(e["status"] for _, e in hits)
    if settings.through_gateway:
        # Each instance answered 429 once (its fault's count) and one of them
        # then served the retried request; none was asked while cooling down.
        assert statuses.count(429) == len(fleet.sims), statuses
        assert statuses.count(200) == 1, statuses
        assert len({i for i, e in hits if e["status"] == 429}) == len(fleet.sims)
    else:
        assert statuses == [200, 429]
    for _, e in hits:
        assert e["body_sha256"] == attempts[-1].sha256
        assert_backend_credentials(settings, e)


def test_sdk_waits_retry_after_ms_then_succeeds_when_every_instance_is_throttled(settings, recorder, fleet):
    _run(make_azure, settings, recorder, fleet)


def test_v1_client_waits_retry_after_ms_then_succeeds_when_every_instance_is_throttled(settings, recorder, fleet):
    _run(make_v1, settings, recorder, fleet)
