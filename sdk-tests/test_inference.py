"""Stateless inference APIs through the gateway with the official Python SDK:
chat (plain and streamed with usage), completions, embeddings, images,
transcription, speech and the models list. Each test checks what the client
got and what exactly one instance received."""

from __future__ import annotations

import io
import time
import json
import wave

import httpx2
import openai
import pytest

from conftest import assert_forwarded_once
from harness import API_VERSION, DEPLOYMENT, EMBEDDING_DEPLOYMENT, Recorder, header


def _is_azure(client: openai.OpenAI) -> bool:
    return isinstance(client, openai.AzureOpenAI)


def _expected_path(client: openai.OpenAI, deployment: str, op: str) -> str:
    if _is_azure(client):
        return f"/openai/deployments/{deployment}/{op}"
    return f"/openai/v1/{op}"


def _sse_payloads(raw: bytes) -> list[str]:
    """The data payloads of an SSE body, in order (the ``[DONE]`` marker included)."""
    out = []
    for event in raw.decode().replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip() for line in event.split("\n") if line.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out


def _delta(event: dict) -> tuple:
    """What an SSE event carries apart from its random id and timestamp."""
    choices = event.get("choices") or []
    return (
        tuple((c.get("delta") or {}).get("content") for c in choices),
        tuple(c.get("finish_reason") for c in choices),
        json.dumps(event.get("usage"), sort_keys=True),
    )


def test_chat_completion_reaches_one_instance_with_the_backend_key(client, recorder, fleet, settings):
    r = client.chat.completions.create(
        model=DEPLOYMENT,
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=20,
    )
    assert r.object == "chat.completion"
    assert r.choices and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.usage is not None and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    sent = recorder.only("/chat/completions")
    assert sent.path == _expected_path(client, DEPLOYMENT, "chat/completions")
    if _is_azure(client):
        assert f"api-version={API_VERSION}" in sent.query
    assert_forwarded_once(settings, fleet, sent, deployment=DEPLOYMENT)
    # Azure's response headers reach the client (SDKs and operators read them).
    for h in ("apim-request-id", "x-ratelimit-remaining-requests", "x-ms-region"):
        assert h in sent.response_headers, h


def test_streamed_chat_yields_every_chunk_and_the_usage_chunk(client, recorder, fleet, settings):
    stream = client.chat.completions.create(
        model=DEPLOYMENT,
        messages=[{"role": "user", "content": "Count to five"}],
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    sent = recorder.only("/chat/completions")
    assert sent.status == 200
    assert sent.response_headers.get("content-type", "").startswith("text/event-stream")
    payloads = _sse_payloads(bytes(sent.response_body))
    assert payloads and payloads[-1] == "[DONE]", "the stream must end with [DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    # The SDK's iterator hands the application every event the backend sent.
    assert len(chunks) == len(events)
    assert [c.id for c in chunks] == [e["id"] for e in events]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), "the stream carried content"
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1, "exactly one chunk carries usage"
    usage = usage_chunks[0]
    assert usage is chunks[-1], "the usage chunk comes last, just before [DONE]"
    assert usage.choices == []
    assert usage.usage.completion_tokens > 0
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + usage.usage.completion_tokens

    idx, e = assert_forwarded_once(settings, fleet, sent, deployment=DEPLOYMENT)
    assert e["outcome"] == "completed"

    # The same request straight to the instance that served it gives the same
    # sequence of events: the gateway neither dropped, merged nor added any.
    direct = httpx2.post(
        settings.sim_urls[idx] + sent.path + (f"?{sent.query}" if sent.query else ""),
        content=sent.body,
        headers={"api-key": settings.sim_key, "content-type": "application/json"},
        timeout=20.0,
    )
    assert direct.status_code == 200
    direct_events = [json.loads(p) for p in _sse_payloads(direct.content)[:-1]]
    assert len(direct_events) == len(events)
    assert [_delta(e) for e in direct_events] == [_delta(e) for e in events]


def test_completion_reaches_one_instance(azure, recorder, fleet, settings):
    r = azure.completions.create(model=DEPLOYMENT, prompt="Once upon a time", max_tokens=10)
    assert r.object == "text_completion"
    assert r.choices and r.choices[0].text
    sent = recorder.only("/completions")
    assert sent.path == f"/openai/deployments/{DEPLOYMENT}/completions"
    assert_forwarded_once(settings, fleet, sent, deployment=DEPLOYMENT)


def test_embeddings_return_one_vector_per_input(client, recorder, fleet, settings):
    r = client.embeddings.create(model=EMBEDDING_DEPLOYMENT, input=["first text", "second text"])
    assert r.object == "list"
    assert [d.index for d in r.data] == [0, 1]
    assert len(r.data[0].embedding) > 0
    assert len(r.data[0].embedding) == len(r.data[1].embedding)
    sent = recorder.only("/embeddings")
    assert sent.path == _expected_path(client, EMBEDDING_DEPLOYMENT, "embeddings")
    assert_forwarded_once(settings, fleet, sent, deployment=EMBEDDING_DEPLOYMENT)


def test_image_generation_reaches_one_instance(azure, recorder, fleet, settings):
    r = azure.images.generate(model="dall-e-3", prompt="a lighthouse at dusk", n=1, size="1024x1024")
    assert r.data and (r.data[0].url or r.data[0].b64_json)
    sent = recorder.only("/images/generations")
    assert sent.path == "/openai/deployments/dall-e-3/images/generations"
    assert_forwarded_once(settings, fleet, sent, deployment="dall-e-3")


def _wav(seconds: float = 0.25, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(int(seconds * rate) * 2))
    return buf.getvalue()


@pytest.mark.parametrize("response_format", ["json", "text"])
def test_transcription_forwards_the_multipart_body_byte_for_byte(azure, recorder, fleet, settings, response_format):
    audio = _wav()
    r = azure.audio.transcriptions.create(
        model="whisper", file=("hello.wav", audio, "audio/wav"), response_format=response_format
    )
    text = r.text if response_format == "json" else r
    assert isinstance(text, str) and str(len(audio)) in text
    sent = recorder.only("/audio/transcriptions")
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert audio in sent.body
    _, e = assert_forwarded_once(settings, fleet, sent, deployment="whisper")
    assert (header(e, "content-type") or "") == sent.headers["content-type"], "the boundary must survive"


def test_speech_bytes_through_the_gateway_equal_the_instance_bytes(azure, recorder, fleet, settings):
    params = dict(model="tts", voice="alloy", input="The quick brown fox.", response_format="mp3")
    through = azure.audio.speech.create(**params).read()
    sent = recorder.only("/audio/speech")
    assert sent.headers.get("accept") == "application/octet-stream"
    idx, _ = assert_forwarded_once(settings, fleet, sent, deployment="tts")

    direct_recorder = Recorder()
    direct_client = openai.AzureOpenAI(
        azure_endpoint=settings.sim_urls[idx],
        api_key=settings.sim_key,
        api_version=API_VERSION,
        max_retries=0,
        http_client=direct_recorder.http_client(),
    )
    with direct_client:
        direct = direct_client.audio.speech.create(**params).read()
    assert len(through) > 0
    assert through == direct, "binary audio must be byte-exact through the gateway"
    direct_sent = direct_recorder.only("/audio/speech")
    assert direct_sent.sha256 == sent.sha256, "the same request was sent both ways"
    for h in ("content-type",):
        assert sent.response_headers.get(h) == direct_sent.response_headers.get(h), h


def test_models_list_is_served_by_one_instance(client, recorder, fleet, settings):
    page = client.models.list()
    models = list(page)
    assert models and all(m.id for m in models)
    sent = recorder.only("/models", method="GET")
    assert sent.path == ("/openai/models" if _is_azure(client) else "/openai/v1/models")
    assert_forwarded_once(settings, fleet, sent)


@pytest.mark.parametrize("deployment", ["gpt-4o", "gpt-4o-mini"])
def test_the_deployment_in_the_path_reaches_the_instance(azure, recorder, fleet, settings, deployment):
    azure.chat.completions.create(model=deployment, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    sent = recorder.only("/chat/completions")
    assert sent.path == f"/openai/deployments/{deployment}/chat/completions"
    assert_forwarded_once(settings, fleet, sent, deployment=deployment)


def test_closing_a_stream_early_cancels_the_backend_request(client, recorder, fleet, settings):
    # Slow every instance's stream down so that it is still running when the
    # application stops reading.
    for sim in fleet.sims:
        sim.inject({"kind": "drip", "count": 1, "bytes": 64, "interval_ms": 100})
    stream = client.chat.completions.create(
        model=DEPLOYMENT,
        messages=[{"role": "user", "content": "Tell a long story"}],
        max_tokens=50,
        stream=True,
    )
    first = next(iter(stream))
    assert first is not None
    stream.close()

    sent = recorder.only("/chat/completions")
    hits = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        hits = fleet.entries(lambda e: e["path"] == sent.path)
        if hits and all(e["outcome"] != "in_flight" for _, e in hits):
            break
        time.sleep(0.05)
    assert len(hits) == 1
    _, e = hits[0]
    # The gateway dropped its backend connection instead of draining the
    # rest of a response nobody reads (which would keep burning tokens).
    assert e["outcome"] == "client_aborted", e["outcome"]
    assert time.monotonic() < deadline


def test_azure_client_with_a_bearer_token_is_accepted_and_the_token_stays_at_the_gateway(settings, recorder, fleet):
    # Code written for Entra ID passes the gateway's key as the token: the SDK
    # then sends `Authorization: Bearer` instead of `api-key`.
    client = openai.AzureOpenAI(
        azure_endpoint=settings.gateway_url,
        azure_ad_token_provider=lambda: settings.client_key,
        api_version=API_VERSION,
        http_client=recorder.http_client(),
        max_retries=0,
        timeout=20.0,
    )
    with client:
        r = client.chat.completions.create(model=DEPLOYMENT, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert r.object == "chat.completion"
    sent = recorder.only("/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {settings.client_key}"
    assert "api-key" not in sent.headers
    assert_forwarded_once(settings, fleet, sent, deployment=DEPLOYMENT)
