"""The operator routes, admin keys, protected probes and CORS, in process.

The app runs with the real `Backend` over the toy tokenizer of test_hostile (one token per
character, plus a BOS id when special tokens are added) and scheduler stand-ins that answer
FlushCache and the server-info calls as the real scheduler client does.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from starlette.testclient import TestClient

from radixserve.v1 import scheduler_pb2 as spb
from services.cli import build_parser
from services.gateway.app import build_app
from services.gateway.config import GatewayConfig
from services.gateway.convert import load_from_pb, scheduler_state_from_pb
from services.gateway.errors import Unavailable, from_status
from services.gateway.limits import INT32_MAX
from services.gateway.router import SchedulerLoad, SchedulerRouter
from services.gateway.sampling import MAX_CHARS_PER_TOKEN
from services.serve import child_commands
from tests.gateway.fakes import char_decode, ids_of
from tests.gateway.hostile import ANY, Case, check_answer, dumps
from tests.gateway.test_fields import MODEL
from tests.gateway.test_hostile import CharTokenizer, FakeBackend

BOS = 1  # the toy tokenizer's one special token
USER, ADMIN = "user-key", "admin-key"
ORIGIN = "https://ui.example"
LOAD = spb.GetLoadResponse(num_running=3, kv_slots_total=64)
TOKENIZE, DETOKENIZE = "/tokenize", "/detokenize"
# Every Unicode code point is a token of the toy vocabulary.
OPS_MODEL = replace(
    MODEL, vocab_size=0x110000, model_path="/models/m", architecture="LlamaForCausalLM"
)


class OpsTokenizer(CharTokenizer):
    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls += 1
        return [BOS] * add_special_tokens + ids_of(text)

    async def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return char_decode([i for i in ids if not (skip_special_tokens and i == BOS)])

    async def model_path(self) -> str:
        return "/models/tokenizer"


class OpsScheduler:
    """Answers FlushCache (refused while `busy`, as FAILED_PRECONDITION) and the state calls."""

    def __init__(self, address: str, busy: bool = False, reachable: bool = True) -> None:
        self.address, self.busy, self.reachable = address, busy, reachable
        self.flushes = 0

    def _check(self) -> None:
        if not self.reachable:
            raise Unavailable(f"the scheduler at {self.address} is unavailable")

    async def flush_cache(self) -> int:
        self._check()
        if self.busy:
            details = "1 running and 2 waiting requests"
            raise from_status(grpc.StatusCode.FAILED_PRECONDITION, details, self.address)
        self.flushes += 1
        return 100

    async def state(self) -> dict:
        self._check()
        info = spb.GetModelInfoResponse(served_model_name="m", eos_token_ids=[2], num_kv_slots=64)
        return scheduler_state_from_pb(self.address, info, LOAD)

    async def load(self) -> SchedulerLoad:
        self._check()
        return load_from_pb(self.address, LOAD)


class OpsBackend(FakeBackend):
    def __init__(self, cfg: GatewayConfig) -> None:
        super().__init__(cfg)
        self.tokenizer = OpsTokenizer()  # type: ignore[assignment]
        ops = {a: OpsScheduler(a) for a in ("s:1", "s:2")}
        self.router = SchedulerRouter(list(ops), cfg.load_refresh_s, ops.__getitem__)  # type: ignore[arg-type]
        self._model = OPS_MODEL


def app_client(**options: object) -> TestClient:
    app = build_app(GatewayConfig(**options), backend_factory=OpsBackend)  # type: ignore[arg-type]
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """No keys: every route is open."""
    with app_client() as c:
        yield c


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient]:
    """User and admin keys, protected probes, CORS for ORIGIN."""
    options = {"api_key": [USER], "admin_api_key": [ADMIN], "protect_metrics": True}
    with app_client(**options, allowed_origins=[ORIGIN]) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def schedulers(client: TestClient) -> list[OpsScheduler]:
    return client.app.state.backend.schedulers  # type: ignore[attr-defined]


# ---- /tokenize and /detokenize -----------------------------------------------------------------


def test_tokenize_a_prompt(client: TestClient) -> None:
    body = client.post(TOKENIZE, json={"prompt": "hi"}).json()
    assert body == {"tokens": [BOS, 104, 105], "count": 3, "max_model_len": MODEL.context_length}
    plain = client.post(TOKENIZE, json={"model": "m", "prompt": "hi", "add_special_tokens": False})
    assert plain.json()["tokens"] == [104, 105]


def test_tokenize_a_batch_answers_one_list_per_prompt(client: TestClient) -> None:
    body = client.post(TOKENIZE, json={"prompt": ["a", "bc"]}).json()
    assert body["tokens"] == [[BOS, 97], [BOS, 98, 99]] and body["count"] == [2, 3]


def test_tokenize_messages_as_the_chat_route_renders_them(client: TestClient) -> None:
    messages = [{"role": "system", "content": "be "}, {"role": "user", "content": "brief"}]
    body = client.post(TOKENIZE, json={"messages": messages}).json()
    assert body["tokens"] == ids_of("be brief") and body["count"] == 8


@pytest.mark.parametrize("text", ["hello world", "", "ünïcödé ✓ 😀", " two  spaces\nand a line"])
def test_tokenize_then_detokenize_gives_the_text_back(client: TestClient, text: str) -> None:
    tokens = client.post(TOKENIZE, json={"prompt": text}).json()["tokens"]
    body = client.post(DETOKENIZE, json={"tokens": tokens}).json()
    assert body == {"text": text, "prompt": text}


def test_detokenize_keeps_special_tokens_on_request(client: TestClient) -> None:
    body = {"tokens": [BOS, 104, 105], "skip_special_tokens": False}
    assert client.post(DETOKENIZE, json=body).json()["text"] == "\x01hi"


def test_detokenize_a_batch(client: TestClient) -> None:
    body = client.post(DETOKENIZE, json={"tokens": [[104, 105], [], [BOS, 111]]}).json()
    assert body["text"] == body["prompt"] == ["hi", "", "o"]
    assert client.post(DETOKENIZE, json={"tokens": []}).json()["text"] == ""


def bad(case_id: str, path: str, body: object, param: str | None = ANY, **kw: object) -> Case:
    raw = body if isinstance(body, bytes) else dumps(body)
    return Case(case_id, path, raw, param=param, **kw)  # type: ignore[arg-type]


LONGEST = MODEL.context_length * MAX_CHARS_PER_TOKEN
BAD_INPUT = [
    bad("tok-neither", TOKENIZE, {}, "prompt"),
    bad(
        "tok-both",
        TOKENIZE,
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        "prompt",
    ),
    bad("tok-prompt-int", TOKENIZE, {"prompt": 1}, "prompt"),
    bad("tok-prompt-ids", TOKENIZE, {"prompt": [1, 2]}, "prompt[0]"),
    bad("tok-prompt-empty-list", TOKENIZE, {"prompt": []}, "prompt"),
    bad("tok-prompt-obj", TOKENIZE, {"prompt": {"a": 1}}, "prompt"),
    bad("tok-special-str", TOKENIZE, {"prompt": "a", "add_special_tokens": "yes"}),
    bad("tok-messages-empty", TOKENIZE, {"messages": []}, "messages"),
    bad(
        "tok-role", TOKENIZE, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"
    ),
    bad("tok-surrogate", TOKENIZE, b'{"prompt": "\\ud800"}', "prompt"),
    bad("tok-nan", TOKENIZE, b'{"prompt": "a", "x": NaN}', None),
    bad("tok-dup-key", TOKENIZE, b'{"prompt": "a", "prompt": "b"}', None),
    bad("tok-not-object", TOKENIZE, [1], None),
    bad("tok-malformed", TOKENIZE, b'{"prompt": ', None),
    bad("tok-too-long", TOKENIZE, {"prompt": "x" * (LONGEST + 1)}, "prompt"),
    bad("tok-model", TOKENIZE, {"prompt": "a", "model": "gpt-9"}, "model", status=404),
    bad("detok-missing", DETOKENIZE, {}, "tokens"),
    bad("detok-str", DETOKENIZE, {"tokens": "hi"}, "tokens"),
    bad("detok-str-id", DETOKENIZE, {"tokens": ["1"]}, "tokens[0]"),
    bad("detok-float-id", DETOKENIZE, {"tokens": [1.0]}, "tokens[0]"),
    bad("detok-bool-id", DETOKENIZE, {"tokens": [True]}, "tokens[0]"),
    bad("detok-negative", DETOKENIZE, {"tokens": [-1]}, "tokens[0]"),
    bad("detok-int32", DETOKENIZE, {"tokens": [INT32_MAX + 1]}, "tokens[0]"),
    bad("detok-vocab", DETOKENIZE, {"tokens": [OPS_MODEL.vocab_size]}, "tokens"),
    bad("detok-mixed", DETOKENIZE, {"tokens": [[1], 2]}),
    bad("detok-batch-vocab", DETOKENIZE, {"tokens": [[1], [OPS_MODEL.vocab_size]]}, "tokens"),
    bad("detok-too-many", DETOKENIZE, {"tokens": [1] * (LONGEST + 1)}, "tokens"),
    bad("detok-skip-int", DETOKENIZE, {"tokens": [1], "skip_special_tokens": 1}),
    bad("detok-model", DETOKENIZE, {"tokens": [1], "model": "gpt-9"}, "model", status=404),
    bad("detok-get", DETOKENIZE, b"", None, status=405, method="GET"),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c.id for c in BAD_INPUT])
def test_bad_input_is_a_clean_4xx_naming_the_field(client: TestClient, case: Case) -> None:
    response = client.request(case.method, case.path, content=case.body)
    check_answer(case, response.status_code, response.headers, response.content)


# ---- /version, /get_model_info, /get_server_info -----------------------------------------------


def test_version_is_the_package_version_and_needs_no_key(keyed: TestClient) -> None:
    response = keyed.get("/version")
    assert response.json() == {"version": importlib.metadata.version("radixserve")}


def test_model_info_has_sglangs_fields(keyed: TestClient) -> None:
    assert keyed.get("/get_model_info").status_code == 401
    body = keyed.get("/get_model_info", headers=bearer(USER)).json()
    assert body["model_path"] == "/models/m" and body["tokenizer_path"] == "/models/tokenizer"
    assert body["is_generation"] is True and body["architectures"] == ["LlamaForCausalLM"]
    assert body["weight_version"] == "default" and body["has_image_understanding"] is False


def test_server_info_shows_flags_and_schedulers_but_no_keys(keyed: TestClient) -> None:
    response = keyed.get("/get_server_info", headers=bearer(ADMIN))
    body = response.json()
    assert body["port"] == 8000 and body["allowed_origins"] == [ORIGIN]
    assert body["version"] == importlib.metadata.version("radixserve")
    assert [s["address"] for s in body["internal_states"]] == ["s:1", "s:2"]
    state = body["internal_states"][0]
    assert state["num_running"] == 3 and state["num_kv_slots"] == 64
    assert state["eos_token_ids"] == [2] and state["served_model_name"] == "m"
    assert "api_key" not in body and "admin_api_key" not in body
    assert USER not in response.text and ADMIN not in response.text


def test_server_info_reports_an_unreachable_scheduler(client: TestClient) -> None:
    schedulers(client)[1].reachable = False
    try:
        states = client.get("/get_server_info").json()["internal_states"]
    finally:
        schedulers(client)[1].reachable = True
    assert states[0]["num_running"] == 3
    assert states[1] == {"address": "s:2", "error": "the scheduler at s:2 is unavailable"}


# ---- /flush_cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_flush_cache_flushes_every_scheduler(client: TestClient, method: str) -> None:
    before = [s.flushes for s in schedulers(client)]
    response = client.request(method, "/flush_cache")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "Cache flushed: 200 cached tokens freed.\n"
    assert [s.flushes for s in schedulers(client)] == [n + 1 for n in before]


def test_flush_cache_while_requests_run_is_a_400(client: TestClient) -> None:
    schedulers(client)[1].busy = True
    try:
        response = client.post("/flush_cache")
    finally:
        schedulers(client)[1].busy = False
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "server_busy" and error["type"] == "invalid_request_error"
    assert "1 running and 2 waiting requests" in error["message"]


def test_flush_cache_with_a_scheduler_gone_is_a_503(client: TestClient) -> None:
    schedulers(client)[0].reachable = False
    try:
        response = client.post("/flush_cache")
    finally:
        schedulers(client)[0].reachable = True
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"


# ---- keys --------------------------------------------------------------------------------------


ADMIN_ROUTES = [("POST", "/flush_cache"), ("GET", "/flush_cache"), ("GET", "/get_server_info")]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_admin_routes_take_only_the_admin_key(keyed: TestClient, method: str, path: str) -> None:
    for headers in [{}, bearer(USER), bearer("wrong"), {"Authorization": ADMIN}]:
        response = keyed.request(method, path, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert keyed.request(method, path, headers=bearer(ADMIN)).status_code == 200


def test_user_routes_take_only_the_api_key(keyed: TestClient) -> None:
    assert keyed.post(TOKENIZE, json={"prompt": "a"}).status_code == 401
    assert keyed.post(TOKENIZE, json={"prompt": "a"}, headers=bearer(ADMIN)).status_code == 401
    assert keyed.post(TOKENIZE, json={"prompt": "a"}, headers=bearer(USER)).status_code == 200
    assert keyed.post(DETOKENIZE, json={"tokens": [97]}, headers=bearer(USER)).status_code == 200


def test_without_admin_keys_admin_routes_take_the_api_key() -> None:
    with app_client(api_key=[USER]) as c:
        assert c.get("/get_server_info").status_code == 401
        assert c.get("/get_server_info", headers=bearer(USER)).status_code == 200
        assert c.post("/flush_cache", headers=bearer(USER)).status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/health_generate"])
def test_protected_probes_take_either_key(keyed: TestClient, path: str) -> None:
    response = keyed.get(path)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert keyed.get(path, headers=bearer(USER)).status_code == 200
    assert keyed.get(path, headers=bearer(ADMIN)).status_code == 200
    assert keyed.get("/health").status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/health_generate"])
def test_probes_are_open_by_default_even_with_keys(path: str) -> None:
    with app_client(api_key=[USER], admin_api_key=[ADMIN]) as c:
        assert c.get(path).status_code == 200


# ---- CORS --------------------------------------------------------------------------------------


def preflight(client: TestClient, origin: str = ORIGIN):  # type: ignore[no-untyped-def]
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    return client.options("/v1/chat/completions", headers=headers)


def test_a_preflight_gets_the_cors_headers(keyed: TestClient) -> None:
    response = preflight(keyed)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in response.headers


def test_answers_and_errors_carry_the_cors_headers(keyed: TestClient) -> None:
    ok = keyed.get("/version", headers={"Origin": ORIGIN})
    denied = keyed.post(TOKENIZE, json={"prompt": "a"}, headers={"Origin": ORIGIN})
    assert denied.status_code == 401
    for response in (ok, denied):
        assert response.headers["access-control-allow-origin"] == ORIGIN


def test_a_generation_answer_exposes_its_request_id_cross_origin(keyed: TestClient) -> None:
    """The preflight of a generation route is answered by CORS alone (no request id, no log
    line); the answer itself lets the browser read its X-Request-Id."""
    assert "x-request-id" not in preflight(keyed).headers
    response = keyed.post(
        "/v1/completions",
        json={"prompt": "hi", "max_tokens": 1},
        headers={"Origin": ORIGIN, "X-Request-Id": "browser-1"},
    )
    assert response.headers["x-request-id"] == "browser-1"
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


def test_another_origin_gets_no_cors_headers(keyed: TestClient) -> None:
    assert preflight(keyed, "https://evil.example").status_code == 400
    response = keyed.get("/version", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers


def test_without_allowed_origins_there_is_no_cors(client: TestClient) -> None:
    response = preflight(client)
    assert response.status_code == 405 and "access-control-allow-origin" not in response.headers
    assert (
        "access-control-allow-origin"
        not in client.get("/version", headers={"Origin": ORIGIN}).headers
    )


def test_cors_methods_headers_and_credentials_follow_the_flags() -> None:
    options = {"allowed_methods": ["GET"], "allowed_headers": ["x-custom"]}
    with app_client(allowed_origins=[ORIGIN], allow_credentials=True, **options) as c:
        assert preflight(c).status_code == 400  # POST and authorization are not allowed
        headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
        response = c.options(
            "/version", headers={**headers, "Access-Control-Request-Headers": "x-custom"}
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-credentials"] == "true"


# ---- flags -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"admin_api_key": [""]}, "--admin-api-key"),
        ({"protect_metrics": True}, "--protect-metrics"),
        ({"ssl_keyfile": __file__}, "go together"),
        ({"ssl_keyfile": "/no/key.pem", "ssl_certfile": __file__}, "no such TLS file"),
    ],
)
def test_bad_operation_flags_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewayConfig(**options)


def test_serve_hands_the_operation_flags_to_the_gateway(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_text("k")
    cert.write_text("c")
    flags = ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--admin-api-key", ADMIN]
    flags += ["--allowed-origins", ORIGIN, "--protect-metrics", "--api-key", USER]
    args = build_parser().parse_args(["serve", *flags])
    commands = dict(child_commands(args))
    gateway = commands["gateway"]
    for flag in flags:
        assert flag in gateway, flag
    assert all("--ssl-keyfile" not in argv for name, argv in commands.items() if name != "gateway")
