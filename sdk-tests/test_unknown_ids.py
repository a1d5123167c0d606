"""Objects the gateway never saw being created: made before it restarted, or
through another replica of it (Container Apps runs several). The gateway has
no record of which instance holds them, so it must find out by asking the
instances, whether the id is in the path or in the body, and remember the
answer."""

from __future__ import annotations

import openai
import pytest

from conftest import assert_backend_credentials
from harness import API_VERSION, DEPLOYMENT, Recorder
from stateful import jsonl

def _owners(fleet) -> list[int]:
    """Each instance twice, in an order no simple rotation follows, so that a
    gateway that merely guessed the right instance every time is unlikely."""
    n = len(fleet.sims)
    return list(range(n)) + list(reversed(range(n)))


def _direct(settings, idx: int) -> openai.AzureOpenAI:
    """A client of one instance, bypassing the gateway."""
    return openai.AzureOpenAI(
        azure_endpoint=settings.sim_urls[idx],
        api_key=settings.sim_key,
        api_version=API_VERSION,
        max_retries=0,
        http_client=Recorder().http_client(),
    )


def _asked(fleet, method: str, path: str) -> list[tuple[int, int]]:
    fleet.wait_settled()
    return [(i, e["status"]) for i, e in fleet.entries(lambda e: e["method"] == method and e["path"] == path)]


def test_file_unknown_to_the_gateway_is_found_by_asking_the_instances(azure, fleet, settings):
    for owner in _owners(fleet):
        with _direct(settings, owner) as direct:
            f = direct.files.create(file=(f"elsewhere-{owner}.jsonl", jsonl(f"elsewhere-{owner}")), purpose="batch")
        fleet.reset()

        assert azure.files.retrieve(f.id).id == f.id
        asked = _asked(fleet, "GET", f"/openai/files/{f.id}")
        assert (owner, 200) in asked
        assert len(asked) == len({i for i, _ in asked}), f"an instance was asked twice: {asked}"
        for _, e in fleet.entries():
            assert_backend_credentials(settings, e)

        # The answer is remembered: the next request goes straight there.
        fleet.reset()
        assert azure.files.content(f.id).read() == jsonl(f"elsewhere-{owner}")
        assert _asked(fleet, "GET", f"/openai/files/{f.id}/content") == [(owner, 200)]


def test_unknown_object_is_404_after_asking_each_instance_once(client, fleet, settings):
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-0000000000000000000000000000dead")
    prefix = "/openai/files" if isinstance(client, openai.AzureOpenAI) else "/openai/v1/files"
    asked = _asked(fleet, "GET", f"{prefix}/file-0000000000000000000000000000dead")
    assert sorted(asked) == [(i, 404) for i in range(len(fleet.sims))]


def test_previous_response_id_unknown_to_the_gateway_is_found_by_asking_the_instances(client, fleet, settings):
    prefix = "/openai/responses" if isinstance(client, openai.AzureOpenAI) else "/openai/v1/responses"
    for owner in _owners(fleet):
        with _direct(settings, owner) as direct:
            first = direct.responses.create(model=DEPLOYMENT, input="My name is Ada.")
        fleet.reset()
        nxt = client.responses.create(model=DEPLOYMENT, input="What is my name?", previous_response_id=first.id)
        assert nxt.previous_response_id == first.id
        asked = _asked(fleet, "POST", prefix)
        assert [s for _, s in asked].count(200) == 1 and (owner, 200) in asked, asked
        assert len(asked) == len({i for i, _ in asked}), f"an instance was asked twice: {asked}"


def test_batch_input_file_unknown_to_the_gateway_is_found_by_asking_the_instances(azure, fleet, settings):
    for owner in _owners(fleet):
        with _direct(settings, owner) as direct:
            f = direct.files.create(file=(f"input-{owner}.jsonl", jsonl(f"input-{owner}")), purpose="batch")
        fleet.reset()
        batch = azure.batches.create(input_file_id=f.id, endpoint="/chat/completions", completion_window="24h")
        assert batch.input_file_id == f.id
        asked = _asked(fleet, "POST", "/openai/batches")
        assert (owner, 200) in asked, asked
        assert len(asked) == len({i for i, _ in asked}), f"an instance was asked twice: {asked}"
