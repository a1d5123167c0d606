"""Named clients and their limits, seen through the official SDK: a
deployment the client may not use is a PermissionDeniedError; a request
larger than the client's whole TPM is a RateLimitError the SDK does not
retry; over its RPM, the SDK waits exactly the gateway's retry-after-ms and
then succeeds (about a minute: the window is 60 s)."""

from __future__ import annotations

import os
import time

import openai
import pytest

from harness import API_VERSION, DEPLOYMENT

pytestmark = pytest.mark.skipif(
    os.environ.get("AOAI_TARGET", "gateway") != "gateway" or not os.environ.get("AOAI_LIMITED_KEY"),
    reason="named clients exist only behind the gateway started by run.sh",
)


def _client(settings, recorder, key: str, max_retries: int) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=settings.gateway_url,
        api_key=key,
        api_version=API_VERSION,
        http_client=recorder.http_client(),
        timeout=90.0,
        max_retries=max_retries,
    )


def _chat(client: openai.AzureOpenAI, max_tokens: int = 5):
    return client.chat.completions.create(
        model=DEPLOYMENT, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens
    )


def _chat_attempts(recorder):
    return [s for s in recorder.sent if s.path.endswith("/chat/completions")]


def test_a_deployment_outside_the_clients_list_is_permission_denied(settings, recorder):
    with _client(settings, recorder, os.environ["AOAI_NARROW_KEY"], max_retries=2) as c:
        with pytest.raises(openai.PermissionDeniedError) as e:
            _chat(c)
    assert e.value.status_code == 403
    assert e.value.code == "DeploymentNotAllowed"
    assert "sdk-narrow" in e.value.message
    assert len(_chat_attempts(recorder)) == 1, "a 403 is not retried"


def test_a_request_larger_than_the_whole_tpm_is_refused_once_without_retry(settings, recorder):
    with _client(settings, recorder, os.environ["AOAI_SMALL_KEY"], max_retries=2) as c:
        with pytest.raises(openai.RateLimitError) as e:
            _chat(c, max_tokens=100)
    assert e.value.code == "rate_limit_exceeded"
    assert "Request too large" in e.value.message
    attempts = _chat_attempts(recorder)
    assert len(attempts) == 1, "x-should-retry: false stops the SDK's retries"
    assert attempts[0].response_headers.get("x-should-retry") == "false"


def test_over_its_rpm_the_sdk_waits_retry_after_ms_and_then_succeeds(settings, recorder):
    with _client(settings, recorder, os.environ["AOAI_LIMITED_KEY"], max_retries=2) as c:
        first = _chat(c)
        assert first.object == "chat.completion"
        started = time.monotonic()
        second = _chat(c)
        elapsed = time.monotonic() - started
    assert second.object == "chat.completion"
    attempts = _chat_attempts(recorder)
    assert [a.status for a in attempts] == [200, 429, 200], [a.status for a in attempts]
    throttled = attempts[1]
    wait_ms = float(throttled.response_headers["retry-after-ms"])
    # The first request leaves the 60 s window: that is the whole wait.
    assert 55_000 < wait_ms <= 60_000, wait_ms
    assert throttled.response_headers["retry-after"] == str(-(-int(wait_ms) // 1000))
    assert throttled.response_headers["x-ratelimit-limit-requests"] == "1"
    assert attempts[2].at - throttled.at >= wait_ms / 1000
    assert elapsed >= wait_ms / 1000
    assert attempts[2].headers.get("x-stainless-retry-count") == "1"
