"""The simulator's token counts against Python ``tiktoken``: every ``usage``
figure aoai-sim reports for chat, completions, embeddings and Responses is
recomputed here with ``tiktoken`` and OpenAI's documented chat framing (3
tokens per message, 1 per ``name``, 3 priming the reply; tool definitions as
their compact JSON with sorted keys, 85 tokens per image part, as the
simulator documents), and the reply text re-tokenizes to exactly
``completion_tokens``.

These tests talk straight to the first simulated instance, never through the
gateway: they check the simulator that the gateway's exact-accounting tests
trust.

``tiktoken`` downloads its rank files on first use and this machine only
reaches package registries, so the files are taken from the Rust
``tiktoken-rs`` crate that the simulator itself is built with (the same bytes,
checked against the hashes ``tiktoken`` expects) and placed in a private
``TIKTOKEN_CACHE_DIR`` under the names ``tiktoken`` looks for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import openai
import pytest

from harness import API_VERSION, Settings

ROOT = Path(__file__).resolve().parent.parent
# Where tiktoken fetches each encoding; its cache key is the SHA-1 of this URL.
BLOB = "https://openaipublic.blob.core.windows.net/encodings/"
# The SHA-256 tiktoken verifies for each file.
EXPECTED_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}

TEXTS = [
    "hello",
    "Hello, world! How are you today?",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nmixed",
    "Ünïcödé àccents, ß, Œ, ø and emoji 🚀🔥👩‍👩‍👧",
    "中文分词测试，日本語のテキスト、한국어 문장",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # code",
    "1234567890 3.14159 1e-9 0xdeadbeef 2026-11-29T14:15:39Z",
    "<|endoftext|> and <|im_start|> are plain text here",
    "antidisestablishmentarianism " * 40,
]


@pytest.fixture(scope="session")
def tiktoken_mod(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``tiktoken`` with its cache filled from the tiktoken-rs crate's assets."""
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    crate = next(p for p in meta["packages"] if p["name"] == "tiktoken-rs")
    assets = Path(crate["manifest_path"]).parent / "assets"
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, sha in EXPECTED_SHA256.items():
        src = assets / f"{name}.tiktoken"
        data = src.read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha, f"{src} is not tiktoken's {name}"
        key = hashlib.sha1(f"{BLOB}{name}.tiktoken".encode()).hexdigest()
        shutil.copyfile(src, cache / key)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    import tiktoken

    return tiktoken


@pytest.fixture
def sim(settings: Settings) -> Any:
    c = openai.AzureOpenAI(
        azure_endpoint=settings.sim_urls[0],
        api_key=settings.sim_key,
        api_version=API_VERSION,
        max_retries=0,
        timeout=20.0,
    )
    yield c
    c.close()


@pytest.fixture
def sim_v1(settings: Settings) -> Any:
    c = openai.OpenAI(
        base_url=settings.sim_urls[0] + "/openai/v1/",
        api_key=settings.sim_key,
        max_retries=0,
        timeout=20.0,
    )
    yield c
    c.close()


def chat_tokens(enc: Any, messages: list[dict[str, str]]) -> int:
    """OpenAI's cookbook count for gpt-4o-era models."""
    n = 3
    for m in messages:
        n += 3
        for key, value in m.items():
            n += len(enc.encode_ordinary(value))
            if key == "name":
                n += 1
    return n


# deployment name -> the encoding the simulator must pick for it
DEPLOYMENTS = {
    "gpt-4o": "o200k_base",
    "gpt-4.1-mini": "o200k_base",
    "gpt-35-turbo": "cl100k_base",
    "gpt-4": "cl100k_base",
    "a-deployment-with-any-name": "o200k_base",
}


@pytest.mark.parametrize("deployment", sorted(DEPLOYMENTS))
def test_chat_prompt_tokens_match_tiktoken_with_openai_framing(
    tiktoken_mod: Any, sim: Any, deployment: str
) -> None:
    enc = tiktoken_mod.get_encoding(DEPLOYMENTS[deployment])
    for text in TEXTS:
        messages = [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "name": "alice", "content": text},
        ]
        r = sim.chat.completions.create(model=deployment, messages=messages)
        assert r.usage.prompt_tokens == chat_tokens(enc, messages), (deployment, text)
        reply = r.choices[0].message.content
        assert r.usage.completion_tokens == len(enc.encode_ordinary(reply)), reply


def test_streamed_reply_text_retokenizes_to_the_reported_completion_tokens(
    tiktoken_mod: Any, sim: Any
) -> None:
    enc = tiktoken_mod.get_encoding("o200k_base")
    chunks = list(
        sim.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": TEXTS[4]}],
            stream=True,
            stream_options={"include_usage": True},
            n=2,
        )
    )
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage.completion_tokens == sum(len(enc.encode_ordinary(t)) for t in texts.values())
    assert usage.prompt_tokens == chat_tokens(enc, [{"role": "user", "content": TEXTS[4]}])


def test_tool_definitions_and_images_count_as_documented(tiktoken_mod: Any, sim: Any) -> None:
    enc = tiktoken_mod.get_encoding("o200k_base")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city, in °C",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        }
    ]
    r = sim.chat.completions.create(model="gpt-4o", messages=messages, tools=tools)
    tools_json = json.dumps(tools, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = (
        3
        + 3
        + len(enc.encode_ordinary("user"))
        + len(enc.encode_ordinary("What is in this picture?"))
        + 85
        + len(enc.encode_ordinary(tools_json))
    )
    assert r.usage.prompt_tokens == expected


@pytest.mark.parametrize("deployment", ["gpt-4o", "gpt-35-turbo"])
def test_completions_prompt_tokens_are_the_plain_encoding(
    tiktoken_mod: Any, sim: Any, deployment: str
) -> None:
    enc = tiktoken_mod.get_encoding(DEPLOYMENTS[deployment])
    for text in TEXTS:
        r = sim.completions.create(model=deployment, prompt=text, max_tokens=5)
        assert r.usage.prompt_tokens == len(enc.encode_ordinary(text)), text
        assert r.usage.completion_tokens == len(enc.encode_ordinary(r.choices[0].text))


@pytest.mark.parametrize(
    "deployment,encoding",
    [("text-embedding-3-small", "cl100k_base"), ("text-embedding-ada-002", "cl100k_base"), ("gpt-4o", "o200k_base")],
)
def test_embeddings_prompt_tokens_are_the_sum_over_inputs(
    tiktoken_mod: Any, sim: Any, deployment: str, encoding: str
) -> None:
    enc = tiktoken_mod.get_encoding(encoding)
    r = sim.embeddings.create(model=deployment, input=TEXTS)
    assert r.usage.prompt_tokens == sum(len(enc.encode_ordinary(t)) for t in TEXTS)
    assert r.usage.total_tokens == r.usage.prompt_tokens


def test_responses_input_tokens_use_the_chat_framing(tiktoken_mod: Any, sim_v1: Any) -> None:
    enc = tiktoken_mod.get_encoding("o200k_base")
    for text in TEXTS[:5]:
        r = sim_v1.responses.create(model="gpt-4o", instructions="Answer briefly.", input=text)
        expected = chat_tokens(
            enc,
            [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}],
        )
        assert r.usage.input_tokens == expected, text
        assert r.usage.output_tokens == len(enc.encode_ordinary(r.output_text))
