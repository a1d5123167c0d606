"""Streams whose usage the gateway asks for on the client's behalf.

A streaming chat request without ``stream_options.include_usage`` goes to the
instance with ``include_usage`` added (the api-version accepts it), so the
gateway can count the stream's tokens exactly; the usage chunk is removed
again before the client sees it. These tests show that the official SDK (both
clients) and LangChain then receive exactly the chunks they would receive
from the instance directly, while the instance did get the option.

Chat completion ids and ``created`` timestamps differ between two requests,
so those two fields are the only ones set aside when comparing.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import openai
import pytest

from conftest import make_azure, make_v1
from harness import API_VERSION, DEPLOYMENT, Recorder

os.environ["LANGCHAIN_TRACING_V2"] = "false"
os.environ["LANGSMITH_TRACING"] = "false"

# What the gateway adds to a body without stream_options.
ADDED = b'"stream_options":{"include_usage":true},'

pytestmark = pytest.mark.skipif(
    os.environ.get("AOAI_TARGET", "gateway") != "gateway",
    reason="compares the gateway with an instance reached directly",
)

MESSAGES = [{"role": "user", "content": "Tell me a short story"}]


def _direct(kind: str, settings, recorder: Recorder) -> openai.OpenAI:
    """A client of the same kind that talks to the first instance itself."""
    url = settings.sim_urls[0]
    if kind == "azure":
        return openai.AzureOpenAI(
            azure_endpoint=url,
            api_key=settings.sim_key,
            api_version=API_VERSION,
            http_client=recorder.http_client(),
            max_retries=0,
            timeout=20.0,
        )
    return openai.OpenAI(
        base_url=url + "/openai/v1/",
        api_key=settings.sim_key,
        http_client=recorder.http_client(),
        max_retries=0,
        timeout=20.0,
    )


def _normalised(chunks: list[Any]) -> list[dict[str, Any]]:
    out = []
    for c in chunks:
        d = c.model_dump(exclude_unset=False)
        d.pop("id", None)
        d.pop("created", None)
        out.append(d)
    return out


_ID = re.compile(rb'"id":"chatcmpl-[^"]*"')
_CREATED = re.compile(rb'"created":[0-9]+')


def _raw(body: bytes | bytearray) -> bytes:
    return _CREATED.sub(b'"created":0', _ID.sub(b'"id":"chatcmpl-x"', bytes(body)))


def _stream(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    stream = client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True, **kwargs)
    return list(stream)


@pytest.mark.parametrize("kind", ["azure", "v1"])
def test_an_injected_stream_gives_the_sdk_the_chunks_the_instance_would(kind, settings, fleet):
    via = Recorder()
    gw = (make_azure if kind == "azure" else make_v1)(settings, via, max_retries=0)
    direct_rec = Recorder()
    direct = _direct(kind, settings, direct_rec)
    try:
        through = _stream(gw)
        straight = _stream(direct)
    finally:
        gw.close()
        direct.close()

    assert _normalised(through) == _normalised(straight)
    assert all(c.usage is None for c in through), "no usage chunk may reach the client"
    assert len(through) >= 3

    # Byte for byte, apart from the id and the timestamp.
    sent = via.only("/chat/completions")
    assert b"stream_options" not in sent.body
    assert _raw(sent.response_body) == _raw(direct_rec.only("/chat/completions").response_body)

    # The instance did get include_usage: its body is the client's plus the option.
    fleet.wait_settled()
    hits = fleet.entries(lambda e: e["path"].endswith("/chat/completions") and e["method"] == "POST")
    through_gateway = [e for _, e in hits if e["body_len"] == len(sent.body) + len(ADDED)]
    assert through_gateway, [e["body_len"] for _, e in hits]


@pytest.mark.parametrize("kind", ["azure", "v1"])
def test_a_client_that_asks_for_usage_still_gets_its_usage_chunk(kind, settings, fleet):
    rec = Recorder()
    gw = (make_azure if kind == "azure" else make_v1)(settings, rec, max_retries=0)
    try:
        chunks = _stream(gw, stream_options={"include_usage": True})
    finally:
        gw.close()
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens > 0 and last.usage.completion_tokens > 0
    sent = rec.only("/chat/completions")
    fleet.wait_settled()
    hits = fleet.entries(lambda e: e["path"].endswith("/chat/completions"))
    assert [e["body_len"] for _, e in hits] == [len(sent.body)], "nothing added"


def test_langchain_gets_the_same_chunks_with_and_without_the_gateway(settings, fleet):
    langchain_openai = pytest.importorskip("langchain_openai")

    def model(endpoint: str, key: str, rec: Recorder):
        return langchain_openai.AzureChatOpenAI(
            azure_endpoint=endpoint,
            api_key=key,
            api_version=API_VERSION,
            azure_deployment=DEPLOYMENT,
            max_retries=0,
            timeout=20,
            stream_usage=False,
            http_client=rec.http_client(),
        )

    via, direct = Recorder(), Recorder()
    through = list(model(settings.gateway_url, settings.client_key, via).stream("Tell me a short story"))
    straight = list(model(settings.sim_urls[0], settings.sim_key, direct).stream("Tell me a short story"))

    def view(chunks):
        out = []
        for c in chunks:
            meta = {k: v for k, v in c.response_metadata.items() if k not in ("id", "created")}
            out.append((c.content, json.dumps(meta, sort_keys=True, default=str), c.usage_metadata))
        return out

    assert b"stream_options" not in via.only("/chat/completions").body
    assert view(through) == view(straight)
    assert all(c.usage_metadata is None for c in through)
    assert _raw(via.only("/chat/completions").response_body) == _raw(
        direct.only("/chat/completions").response_body
    )
