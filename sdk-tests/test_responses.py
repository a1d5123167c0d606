"""The Responses API through the gateway. A stored response lives only on the
instance that produced it: retrieving it, and continuing the conversation
with ``previous_response_id`` (named in the body), must reach that instance."""

from __future__ import annotations

import openai
import pytest

from conftest import assert_forwarded_once
from harness import API_VERSION, DEPLOYMENT
from stateful import FOLLOW_UPS, assert_created_on_one_instance, assert_served_by_owner


def _prefix(client) -> str:
    return "/openai/responses" if isinstance(client, openai.AzureOpenAI) else "/openai/v1/responses"


def test_response_is_created_retrieved_and_deleted_on_its_instance(client, recorder, fleet, settings):
    r = client.responses.create(model=DEPLOYMENT, input="Say hello")
    assert r.id.startswith("resp") and r.status == "completed"
    assert r.output_text
    sent = recorder.only(_prefix(client), method="POST")
    if isinstance(client, openai.AzureOpenAI):
        assert f"api-version={API_VERSION}" in sent.query
    owner, _ = assert_forwarded_once(settings, fleet, sent, deployment=DEPLOYMENT)

    for _ in range(FOLLOW_UPS):
        got = client.responses.retrieve(r.id)
        assert got.id == r.id and got.output_text == r.output_text
    assert_served_by_owner(settings, fleet, owner, "GET", f"{_prefix(client)}/{r.id}", FOLLOW_UPS)

    client.responses.delete(r.id)
    assert_served_by_owner(settings, fleet, owner, "DELETE", f"{_prefix(client)}/{r.id}", 1)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_previous_response_id_chain_continues_on_the_instance_that_holds_it(client, recorder, fleet, settings):
    first = client.responses.create(model=DEPLOYMENT, input="My name is Ada.")
    owner, _ = assert_forwarded_once(settings, fleet, recorder.only(_prefix(client), method="POST"), deployment=DEPLOYMENT)

    previous = first
    for turn in range(3):
        fleet.reset()
        recorder.clear()
        nxt = client.responses.create(model=DEPLOYMENT, input=f"Turn {turn}: what is my name?", previous_response_id=previous.id)
        assert nxt.id != previous.id and nxt.status == "completed"
        assert nxt.previous_response_id == previous.id
        sent = recorder.only(_prefix(client), method="POST")
        assert previous.id.encode() in sent.body
        idx, _ = assert_created_on_one_instance(settings, fleet, sent)
        assert idx == owner, f"turn {turn} went to instance {idx}; the chain lives on {owner}"
        previous = nxt


def test_streamed_response_can_be_retrieved_and_continued_afterwards(client, recorder, fleet, settings):
    events = list(client.responses.create(model=DEPLOYMENT, input="Stream a hello", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.output_text.delta" in types
    done = events[-1].response
    assert done.id.startswith("resp") and done.output_text
    sent = recorder.only(_prefix(client), method="POST")
    owner, _ = assert_forwarded_once(settings, fleet, sent, deployment=DEPLOYMENT)

    # The id was only ever in the event stream; follow-ups still find it.
    got = client.responses.retrieve(done.id)
    assert got.id == done.id and got.output_text == done.output_text
    assert_served_by_owner(settings, fleet, owner, "GET", f"{_prefix(client)}/{done.id}", 1)

    fleet.reset()
    recorder.clear()
    nxt = client.responses.create(model=DEPLOYMENT, input="Again", previous_response_id=done.id)
    assert nxt.previous_response_id == done.id
    idx, _ = assert_created_on_one_instance(settings, fleet, recorder.only(_prefix(client), method="POST"))
    assert idx == owner
