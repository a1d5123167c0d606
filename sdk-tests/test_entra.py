"""Microsoft Entra ID end to end with the official SDK:
``AzureOpenAI(azure_ad_token_provider=...)`` through the gateway to a
simulated instance with local authentication disabled.

The test runs its own processes (the session's fleet takes keys): an aoai-sim
instance started with ``--local-auth-disabled`` and its identity host
(``--identity-port``), and a gateway whose instance uses a managed identity
(``IDENTITY_ENDPOINT`` on the identity host) and whose ``entra`` block
validates the client's tokens against the same simulated tenant. The token
provider asks the identity host to mint a token, as a real provider asks
Entra ID. Skipped unless run.sh exported the binaries (gateway target)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from typing import Iterator

import openai
import pytest

from harness import API_VERSION

SIM_TENANT_ID = "9c1c4e5a-7d0b-4c6e-9a43-5e1f2b3c4d5e"
IDENTITY_HEADER = "sim-identity-header"
CLIENT_KEY = "entra-suite-key-unused-by-the-sdk"
# An application listed by the named client `sdk-entra-app`.
MAPPED_APP_ID = "5d6e7f80-1a2b-4c3d-8e9f-0a1b2c3d4e5f"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _wait(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early with status {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer at {url} within 30 s")


class Stack:
    def __init__(self, gateway: str, identity: str, gateway_log: str) -> None:
        self.gateway = gateway
        self.identity = identity
        self.gateway_log = gateway_log
        self.minted = 0

    def mint(self, **claims: object) -> str:
        req = urllib.request.Request(
            f"{self.identity}/_sim/mint",
            data=json.dumps(claims).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            self.minted += 1
            return json.load(r)["token"]

    def client(self, provider) -> openai.AzureOpenAI:
        return openai.AzureOpenAI(
            azure_endpoint=self.gateway,
            azure_ad_token_provider=provider,
            api_version=API_VERSION,
            max_retries=0,
            timeout=20.0,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    sim_bin = os.environ.get("AOAI_SIM_BIN")
    lb_bin = os.environ.get("AOAI_LB_BIN")
    if not sim_bin or not lb_bin:
        pytest.skip("needs AOAI_SIM_BIN and AOAI_LB_BIN (set by run.sh for the gateway target)")
    logs = tmp_path_factory.mktemp("entra")
    sim_port, id_port, lb_port, admin_port = (_free_port() for _ in range(4))
    procs: list[subprocess.Popen] = []
    sim_log = open(logs / "sim.log", "wb")
    lb_log_path = logs / "lb.log"
    lb_log = open(lb_log_path, "wb")
    try:
        procs.append(
            subprocess.Popen(
                [sim_bin, "--instances", "1", "--base-port", str(sim_port),
                 "--local-auth-disabled", "--identity-port", str(id_port)],
                stdout=sim_log, stderr=subprocess.STDOUT,
            )
        )
        identity = f"http://127.0.0.1:{id_port}"
        _wait(f"{identity}/{SIM_TENANT_ID}/discovery/v2.0/keys", procs[0], "aoai-sim")
        doc = {
            "instances": [{
                "name": "keyless",
                "url": f"http://127.0.0.1:{sim_port}",
                "auth": {"type": "managed_identity"},
            }],
            "entra": {"tenant_id": SIM_TENANT_ID, "allow_any_principal": True},
            "clients": [{
                "name": "sdk-entra-app",
                "entra_app_ids": [MAPPED_APP_ID],
                "deployments": ["gpt-4o-mini"],
            }],
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_", "OPENAI_"))}
        env.update({
            "OPENAI_INSTANCES": json.dumps(doc),
            "API_KEY": CLIENT_KEY,
            "HOST": "127.0.0.1",
            "PORT": str(lb_port),
            "ADMIN_PORT": str(admin_port),
            "LOG_LEVEL": "debug",
            "IDENTITY_ENDPOINT": f"{identity}/msi/token",
            "IDENTITY_HEADER": IDENTITY_HEADER,
            "AZURE_AUTHORITY_HOST": identity,
        })
        procs.append(subprocess.Popen([lb_bin], env=env, stdout=lb_log, stderr=subprocess.STDOUT))
        gateway = f"http://127.0.0.1:{lb_port}"
        _wait(f"{gateway}/health", procs[1], "aoai-lb")
        yield Stack(gateway, identity, str(lb_log_path))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        sim_log.close()
        lb_log.close()


def test_azure_ad_token_provider_reaches_a_keyless_instance(stack: Stack) -> None:
    client = stack.client(lambda: stack.mint(app_id="sdk-suite"))
    before = stack.minted
    r = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert r.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=8,
            stream=True,
        )
    )
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    # The SDK asks its provider for every request; the gateway validated
    # each token and used its own managed identity upstream.
    assert stack.minted - before == 2


@pytest.mark.parametrize(
    "claims, reason",
    [
        ({"expires_in_secs": -300}, "token expired"),
        ({"audience": "https://management.azure.com"}, "audience not accepted"),
        ({"tenant_id": "11111111-2222-4333-8444-555555555555"}, "tenant not accepted"),
        ({"key": "foreign"}, "token signature is invalid"),
    ],
)
def test_a_refused_token_is_an_authentication_error_naming_the_reason(
    stack: Stack, claims: dict, reason: str
) -> None:
    token = stack.mint(**claims)
    client = stack.client(lambda: token)
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
    assert err.value.status_code == 401
    assert reason in str(err.value)
    assert token not in str(err.value)


def test_no_token_in_the_gateway_log(stack: Stack) -> None:
    client = stack.client(lambda: stack.mint())
    client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    with open(stack.gateway_log, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "Entra ID token acquired" in log
    assert "eyJ" not in log
    assert IDENTITY_HEADER not in log


def test_a_listed_application_gets_its_named_clients_permissions(stack: Stack) -> None:
    client = stack.client(lambda: stack.mint(app_id=MAPPED_APP_ID))
    r = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert r.choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
    assert err.value.status_code == 403
    assert "sdk-entra-app" in str(err.value)
