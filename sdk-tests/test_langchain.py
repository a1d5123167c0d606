"""LangChain's Azure chat model through the gateway: a plain call and a stream
with usage, built on the same pinned ``openai`` SDK."""

from __future__ import annotations

import os

import pytest

from conftest import assert_forwarded_once
from harness import API_VERSION, DEPLOYMENT

# Nothing may leave the machine: LangChain's tracing stays off.
os.environ["LANGCHAIN_TRACING_V2"] = "false"
os.environ["LANGSMITH_TRACING"] = "false"

langchain_openai = pytest.importorskip("langchain_openai")


def _model(settings, recorder, **kwargs):
    return langchain_openai.AzureChatOpenAI(
        azure_endpoint=settings.gateway_url,
        api_key=settings.client_key,
        api_version=API_VERSION,
        azure_deployment=DEPLOYMENT,
        max_retries=0,
        timeout=20,
        http_client=recorder.http_client(),
        **kwargs,
    )


def test_langchain_azure_chat_invoke_reaches_one_instance(settings, recorder, fleet):
    reply = _model(settings, recorder).invoke("Say hello")
    assert isinstance(reply.content, str) and reply.content
    assert reply.usage_metadata and reply.usage_metadata["total_tokens"] > 0
    sent = recorder.only("/chat/completions")
    assert sent.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert_forwarded_once(settings, fleet, sent, deployment=DEPLOYMENT)


def test_langchain_azure_chat_stream_yields_text_and_usage(settings, recorder, fleet):
    chunks = list(_model(settings, recorder, stream_usage=True).stream("Count to five"))
    assert len(chunks) >= 3
    text = "".join(c.content for c in chunks if isinstance(c.content, str))
    assert text.strip()
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert total.usage_metadata and total.usage_metadata["output_tokens"] > 0
    sent = recorder.only("/chat/completions")
    assert b'"stream":true' in sent.body.replace(b" ", b"")
    assert_forwarded_once(settings, fleet, sent, deployment=DEPLOYMENT)
