"""Files through the gateway. A file exists only on the instance that stored
it, so every follow-up (retrieve, content, delete) must reach that instance,
and the list must show the files the client uploaded wherever they landed."""

from __future__ import annotations

import json

import openai
import pytest

from conftest import affinity_pending, list_merge_pending, assert_backend_credentials, assert_forwarded_once

FOLLOW_UPS = 4


def _jsonl(tag: str) -> bytes:
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
    data = _jsonl(tag)
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
    assert {i for i, _ in ok} == {owner}, f"served by {[i for i, _ in ok]}, the file is on {owner}"
    others = [i for i, e in hits if i != owner]
    assert len(others) == len(set(others)), f"instances without the object were asked repeatedly: {others}"
    for _, e in hits:
        assert_backend_credentials(settings, e)


@affinity_pending
def test_uploaded_file_can_be_retrieved_read_and_deleted_through_the_gateway(client, recorder, fleet, settings):
    f, owner = upload(client, recorder, fleet, settings, "retrieve-me")
    prefix = "/openai/files" if isinstance(client, openai.AzureOpenAI) else "/openai/v1/files"

    for _ in range(FOLLOW_UPS):
        got = client.files.retrieve(f.id)
        assert got.id == f.id and got.filename == "retrieve-me.jsonl"
    assert_served_by_owner(settings, fleet, owner, "GET", f"{prefix}/{f.id}", FOLLOW_UPS)

    for _ in range(FOLLOW_UPS):
        assert client.files.content(f.id).read() == _jsonl("retrieve-me")
    assert_served_by_owner(settings, fleet, owner, "GET", f"{prefix}/{f.id}/content", FOLLOW_UPS)

    deleted = client.files.delete(f.id)
    assert deleted.id == f.id and deleted.deleted is True
    assert_served_by_owner(settings, fleet, owner, "DELETE", f"{prefix}/{f.id}", 1)

    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


@list_merge_pending
def test_files_list_shows_uploads_from_every_instance(client, recorder, fleet, settings):
    uploaded: dict[str, int] = {}
    # Upload until the files sit on at least two instances (bounded).
    for n in range(3 * len(fleet.sims)):
        f, owner = upload(client, recorder, fleet, settings, f"list-{n}")
        uploaded[f.id] = owner
        fleet.reset()
        if n >= 2 and len(set(uploaded.values())) >= min(2, len(fleet.sims)):
            break
    assert len(set(uploaded.values())) >= min(2, len(fleet.sims)), "the gateway spread uploads over the instances"

    listed = {f.id for f in client.files.list()}
    missing = set(uploaded) - listed
    assert not missing, f"files uploaded through the gateway but not listed: {sorted(missing)}"
    fleet.wait_settled()
    for _, e in fleet.entries(lambda e: e["method"] == "GET"):
        assert_backend_credentials(settings, e)

    for fid in uploaded:
        client.files.delete(fid)
