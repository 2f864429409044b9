"""The operator routes through the real services and the real tokenizer, and a second gateway in
front of the same tokenizer and scheduler with an admin key, CORS and TLS (a self-signed
certificate made here with the openssl command)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.serve import ready
from tests.gateway.conftest import MAX_QUEUED, Stack, gateway_args, wait_ready
from tests.procs import ServiceProcess, free_port

pytestmark = pytest.mark.slow

ADMIN = "admin-e2e"
ORIGIN = "https://ui.example"
TEXTS = [
    "Hello, world!",
    "  leading spaces, tabs\tand\nnew lines  ",
    "ünïcödé, 中文, emoji 😀👍🏽 and a zero-width joiner: 👩‍💻",
    "",
]
SPECIAL = "<|im_start|>user\nhi<|im_end|>"  # special tokens' text is tokenized as those tokens


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def trusted(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    """A client context that trusts the self-signed certificate (and nothing else)."""
    return ssl.create_default_context(cafile=str(tls_files[1]))


@pytest.fixture(scope="module")
def ops_gateway(
    stack: Stack,
    tls_files: tuple[Path, Path],
    trusted: ssl.SSLContext,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """https://127.0.0.1:PORT of a gateway with an admin key, CORS for ORIGIN and TLS."""
    port, (key, cert) = free_port(), tls_files
    extra = ["--api-key", stack.api_key, "--admin-api-key", ADMIN, "--allowed-origins", ORIGIN]
    extra += ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]
    args = gateway_args(port, stack.tokenizer_port, stack.scheduler_port, *extra)
    log = tmp_path_factory.mktemp("ops-gateway") / "gateway.log"
    with ServiceProcess(args, log) as gateway:
        url = f"https://127.0.0.1:{port}"
        wait_ready(gateway, url, verify=trusted)
        yield url
        assert gateway.stop() == 0, gateway.output()[-3000:]


def user(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}"}


def post(stack: Stack, path: str, body: dict) -> dict:
    response = httpx.post(f"{stack.base_url}{path}", json=body, headers=user(stack), timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def wait_idle(stack: Stack, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (load := stack.get_load()).num_running or load.num_waiting:
        assert time.monotonic() < deadline, f"the scheduler is still busy: {load}"
        time.sleep(0.05)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_tokenize_then_detokenize_gives_the_text_back(stack: Stack, text: str) -> None:
    tokenized = post(stack, "/tokenize", {"prompt": text})
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 2048
    detokenized = post(stack, "/detokenize", {"tokens": tokenized["tokens"]})
    assert detokenized == {"text": text, "prompt": text}


def test_special_tokens_round_trip_when_kept(stack: Stack) -> None:
    tokens = post(stack, "/tokenize", {"prompt": SPECIAL})["tokens"]
    kept = post(stack, "/detokenize", {"tokens": tokens, "skip_special_tokens": False})
    assert kept["text"] == SPECIAL
    assert post(stack, "/detokenize", {"tokens": tokens})["text"] == "user\nhi"


def test_a_batch_round_trips_too(stack: Stack) -> None:
    tokens = post(stack, "/tokenize", {"prompt": TEXTS, "model": stack.model})["tokens"]
    assert post(stack, "/detokenize", {"tokens": tokens})["text"] == TEXTS


def test_token_counts_match_what_generation_reports(stack: Stack) -> None:
    prompt = "The capital of France is"
    completion = post(stack, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert (
        post(stack, "/tokenize", {"prompt": prompt})["count"]
        == completion["usage"]["prompt_tokens"]
    )
    messages = [{"role": "user", "content": "Name a prime number."}]
    chat = post(stack, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    count = post(stack, "/tokenize", {"messages": messages})["count"]
    assert count == chat["usage"]["prompt_tokens"]


def test_bad_token_ids_are_a_400(stack: Stack) -> None:
    for tokens, param in [([10**6], "tokens"), ([-1], "tokens[0]"), (["1"], "tokens[0]")]:
        response = httpx.post(
            f"{stack.base_url}/detokenize", json={"tokens": tokens}, headers=user(stack)
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def test_version_and_model_info(stack: Stack) -> None:
    version = httpx.get(f"{stack.base_url}/version").json()["version"]
    assert version and version[0].isdigit()
    info = httpx.get(f"{stack.base_url}/get_model_info", headers=user(stack)).json()
    assert Path(info["model_path"]).exists() and Path(info["tokenizer_path"]).exists()
    assert info["is_generation"] is True and info["architectures"] == ["LlamaForCausalLM"]


def test_flush_cache_empties_the_prefix_cache(stack: Stack, ops_gateway: str, trusted) -> None:
    post(stack, "/v1/completions", {"prompt": "Fill the prefix cache, please.", "max_tokens": 2})
    wait_idle(stack)
    assert stack.get_load().kv_slots_evictable > 0
    admin = {"Authorization": f"Bearer {ADMIN}"}
    response = httpx.post(f"{ops_gateway}/flush_cache", headers=admin, verify=trusted)
    assert response.status_code == 200, response.text
    assert response.text.startswith("Cache flushed")
    assert stack.get_load().kv_slots_evictable == 0


def test_flush_cache_while_a_request_runs_is_a_400(stack: Stack) -> None:
    """The stack's gateway has no admin key: its admin routes take the API key."""
    wait_idle(stack)
    body = {"prompt": "Count to one hundred:", "max_tokens": 64, "ignore_eos": True, "stream": True}
    url = f"{stack.base_url}/v1/completions"
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", url, json=body, headers=user(stack)) as stream,
    ):
        lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
        first = next(line for line in lines if line.startswith("data: {"))
        assert '"choices"' in first and stack.get_load().num_running == 1, first
        response = client.post(f"{stack.base_url}/flush_cache", headers=user(stack))
        stream.close()
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "server_busy"


def test_admin_routes_need_the_admin_key(stack: Stack, ops_gateway: str, trusted) -> None:
    for headers in [{}, user(stack)]:
        for method, path in [("POST", "/flush_cache"), ("GET", "/get_server_info")]:
            response = httpx.request(
                method, f"{ops_gateway}{path}", headers=headers, verify=trusted
            )
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    info = httpx.get(f"{ops_gateway}/get_server_info", headers=admin, verify=trusted)
    assert info.status_code == 200 and ADMIN not in info.text and stack.api_key not in info.text
    (state,) = info.json()["internal_states"]
    assert state["address"] == f"127.0.0.1:{stack.scheduler_port}"
    assert state["kv_slots_total"] > 0 and state["max_queued_requests"] == MAX_QUEUED


def test_a_cors_preflight_is_answered(ops_gateway: str, trusted) -> None:
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    response = httpx.options(f"{ops_gateway}/v1/chat/completions", headers=headers, verify=trusted)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN


def test_tls_serves_https_only(ops_gateway: str, trusted) -> None:
    assert httpx.get(f"{ops_gateway}/health", verify=trusted).status_code == 200
    with pytest.raises(httpx.ConnectError):  # the certificate is not trusted by default
        httpx.get(f"{ops_gateway}/health")
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
        httpx.get(ops_gateway.replace("https://", "http://") + "/health")
    assert ready(f"{ops_gateway}/ready") == (True, "")  # serve's own probe, over TLS
