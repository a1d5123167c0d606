"""The seed app's documented test request still works against the gateway: the
curl from its README, with the Bearer key and the dated path.

The README quotes the header in single quotes (``'Authorization: Bearer
$API_KEY'``), so a shell would send the literal text ``$API_KEY``; the command
below is the README's with that header in double quotes, as its text intends.
Only ``-sS -w`` are added, to read the status; the request is unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from conftest import assert_backend_credentials

SEED_CURL = r"""curl -X POST "$API_ENDPOINT/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview" \
  -H "Content-Type: application/json" \
  -H "Authorization: Bearer $API_KEY" \
  -d '{
          "model": "gpt-4o",
          "messages": [
            {
              "role": "user",
              "content": [
                {
                  "type": "text",
                  "text": "hi"
                }
              ]
            }
          ],
          "max_tokens": 300
        }'"""

SEED_BODY = SEED_CURL.split("-d '", 1)[1].rsplit("'", 1)[0].encode()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_seed_readme_curl_gets_a_chat_completion(settings, fleet):
    env = dict(os.environ, API_ENDPOINT=settings.gateway_url, API_KEY=settings.client_key)
    out = subprocess.run(
        ["bash", "-c", SEED_CURL + " -sS -w '\\n%{http_code}'"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    body, _, status = out.stdout.decode().rpartition("\n")
    assert status == "200", body
    reply = json.loads(body)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"]

    fleet.wait_settled()
    hits = fleet.entries(lambda e: e["path"] == "/openai/deployments/gpt-4o/chat/completions")
    assert len(hits) == 1
    _, e = hits[0]
    assert e["method"] == "POST"
    assert e["query"] == "api-version=2025-01-01-preview"
    assert e["deployment"] == "gpt-4o"
    assert e["body_sha256"] == hashlib.sha256(SEED_BODY).hexdigest()
    assert e["status"] == 200
    assert_backend_credentials(settings, e)


def test_wrong_client_key_is_rejected_before_any_instance(settings, fleet):
    if not settings.through_gateway:
        pytest.skip("the gateway's own check")
    env = dict(os.environ, API_ENDPOINT=settings.gateway_url, API_KEY="not-the-key")
    out = subprocess.run(
        ["bash", "-c", SEED_CURL + " -sS -o /dev/null -w '%{http_code}'"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.stdout.decode() == "401"
    assert fleet.entries() == []
