"""Helpers for stored objects (files, batches, responses): upload a file and
learn which instance stored it, and check that follow-ups reached that
instance."""

from __future__ import annotations

import json

import openai

from conftest import assert_backend_credentials, assert_forwarded_once

FOLLOW_UPS = 4


def jsonl(tag: str) -> bytes:
    line = {
        "custom_id": tag,
        "method": "POST",
        "url": "/chat/completions",
        "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": tag}]},
    }
    return (json.dumps(line) + "\n").encode()


def upload(client, recorder, fleet, settings, tag: str) -> tuple[openai.types.FileObject, int]:
    """Uploads a small JSONL file; returns it and the index of the instance
    that stored it (the only one that received the upload)."""
    before = len(recorder.sent)
    data = jsonl(tag)
    f = client.files.create(file=(f"{tag}.jsonl", data), purpose="batch")
    assert f.id and f.bytes == len(data)
    sent = [s for s in recorder.sent[before:] if s.method == "POST" and s.path.endswith("/files")]
    assert len(sent) == 1
    assert data in sent[0].body
    owner, _ = assert_forwarded_once(settings, fleet, sent[0], status=None)
    return f, owner


def assert_served_by_owner(settings, fleet, owner: int, method: str, path: str, expected_ok: int) -> None:
    """Every successful ``method path`` was served by ``owner``; another
    instance was asked at most once (a lookup whose answer is remembered),
    never once per request as a blind 404 failover would."""
    fleet.wait_settled()
    hits = fleet.entries(lambda e: e["method"] == method and e["path"] == path)
    ok = [(i, e) for i, e in hits if 200 <= e["status"] < 300]
    assert len(ok) == expected_ok, [(i, e["status"]) for i, e in hits]
    assert {i for i, _ in ok} == {owner}, f"served by {[i for i, _ in ok]}, the object is on {owner}"
    others = [i for i, e in hits if i != owner]
    assert len(others) == len(set(others)), f"instances without the object were asked repeatedly: {others}"
    for _, e in hits:
        assert_backend_credentials(settings, e)


def assert_created_on_one_instance(settings, fleet, sent):
    """The creation reached exactly one instance with a 2xx; lookups on others
    (404) are tolerated once each."""
    fleet.wait_settled()
    hits = fleet.entries(lambda e: e["method"] == sent.method and e["path"] == sent.path)
    ok = [(i, e) for i, e in hits if 200 <= e["status"] < 300]
    assert len(ok) == 1, [(i, e["status"]) for i, e in hits]
    others = [i for i, e in hits if (i, e) not in ok]
    assert len(others) == len(set(others)), others
    if len(hits) == 1:
        return assert_forwarded_once(settings, fleet, sent, status=None)
    for _, other in hits:
        assert other["body_sha256"] == sent.sha256
        assert_backend_credentials(settings, other)
    return ok[0]
