"""Batches through the gateway. A batch names its input file in the body
(``input_file_id``), so its creation must reach the instance holding that
file, and the batch then lives only there."""

from __future__ import annotations

import openai

from stateful import FOLLOW_UPS, assert_created_on_one_instance, assert_served_by_owner, upload


def test_batch_is_created_on_the_instance_holding_its_input_file(client, recorder, fleet, settings):
    base = "/openai" if isinstance(client, openai.AzureOpenAI) else "/openai/v1"
    f, owner = upload(client, recorder, fleet, settings, "batch-input")

    batch = client.batches.create(input_file_id=f.id, endpoint="/chat/completions", completion_window="24h")
    assert batch.id and batch.input_file_id == f.id
    assert batch.endpoint == "/chat/completions"
    sent = recorder.only("/batches", method="POST")
    assert f.id.encode() in sent.body
    idx, _ = assert_created_on_one_instance(settings, fleet, sent)
    assert idx == owner, f"batch created on instance {idx}, its input file is on {owner}"

    got = batch
    for _ in range(FOLLOW_UPS):
        got = client.batches.retrieve(batch.id)
        assert got.id == batch.id and got.input_file_id == f.id
    assert_served_by_owner(settings, fleet, owner, "GET", f"{base}/batches/{batch.id}", FOLLOW_UPS)

    # The output file is named only in a retrieve's answer; reading it must
    # reach the same instance.
    assert got.status == "completed" and got.output_file_id
    out = client.files.content(got.output_file_id).read()
    assert b'"custom_id": "batch-input"' in out or b'"custom_id":"batch-input"' in out
    assert_served_by_owner(settings, fleet, owner, "GET", f"{base}/files/{got.output_file_id}/content", 1)


def test_batches_list_includes_batches_on_every_instance(azure, recorder, fleet, settings):
    created: dict[str, int] = {}
    for n in range(3 * len(fleet.sims)):
        f, owner = upload(azure, recorder, fleet, settings, f"batch-list-{n}")
        b = azure.batches.create(input_file_id=f.id, endpoint="/chat/completions", completion_window="24h")
        created[b.id] = owner
        fleet.reset()
        recorder.clear()
        if n >= 2 and len(set(created.values())) >= min(2, len(fleet.sims)):
            break
    listed = {b.id for b in azure.batches.list()}
    missing = set(created) - listed
    assert not missing, f"batches created through the gateway but not listed: {sorted(missing)}"
