"""Files through the gateway. A file exists only on the instance that stored
it, so every follow-up (retrieve, content, delete) must reach that instance,
and the list must show the files the client uploaded wherever they landed."""

from __future__ import annotations

import openai
import pytest

from conftest import assert_backend_credentials
from stateful import FOLLOW_UPS, assert_served_by_owner, jsonl, upload


def test_uploaded_file_can_be_retrieved_read_and_deleted_through_the_gateway(client, recorder, fleet, settings):
    f, owner = upload(client, recorder, fleet, settings, "retrieve-me")
    prefix = "/openai/files" if isinstance(client, openai.AzureOpenAI) else "/openai/v1/files"

    for _ in range(FOLLOW_UPS):
        got = client.files.retrieve(f.id)
        assert got.id == f.id and got.filename == "retrieve-me.jsonl"
    assert_served_by_owner(settings, fleet, owner, "GET", f"{prefix}/{f.id}", FOLLOW_UPS)

    for _ in range(FOLLOW_UPS):
        assert client.files.content(f.id).read() == jsonl("retrieve-me")
    assert_served_by_owner(settings, fleet, owner, "GET", f"{prefix}/{f.id}/content", FOLLOW_UPS)

    deleted = client.files.delete(f.id)
    assert deleted.id == f.id and deleted.deleted is True
    assert_served_by_owner(settings, fleet, owner, "DELETE", f"{prefix}/{f.id}", 1)

    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


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
