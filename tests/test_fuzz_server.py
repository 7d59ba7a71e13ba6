"""Property-based fuzzing of the server from its own OpenAPI schema (schemathesis): for every
operation, bodies that follow the schema and bodies that break it, sent over HTTP to a
running server with the tiny random Llama. Whatever arrives, the answer is never a 5xx, and
a refusal is OpenAI's error JSON.

The number of examples is bounded so the whole module stays well under a minute on two
cores; hypothesis' database is off so every run draws fresh cases from the fixed seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from tiny_models import save_tiny_chat_llama  # noqa: E402

import quicksilver as qs  # noqa: E402
from quicksilver.serve.app import Settings  # noqa: E402
from quicksilver.serve.server import BackgroundServer  # noqa: E402

EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 25}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    directory = save_tiny_chat_llama(tmp_path_factory.mktemp("fuzz") / "tiny")
    llm = qs.load(str(directory), dtype="float32")
    with BackgroundServer(llm, Settings(model_name="tiny", max_body_bytes=64 * 1024)) as running:
        yield running


@pytest.fixture(scope="module")
def operations(server: BackgroundServer) -> dict[str, object]:
    schema = schemathesis.openapi.from_dict(server.app.openapi())
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        found[f"{operation.method.upper()} {operation.path}"] = operation
    return found


def test_every_route_is_in_the_schema_and_post_routes_describe_a_body(operations) -> None:
    expected = {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /tokenize",
        "POST /detokenize",
        "GET /v1/models",
        "GET /health",
        "GET /metrics",
        "GET /tokenizer_info",
    }
    assert expected <= set(operations)
    for name, operation in operations.items():
        if name.startswith("POST"):
            assert operation.body, f"{name} declares no request body"


def fuzz(operation, mode: GenerationMode, url: str, session, seen: dict[int, int]) -> None:
    """Send ``EXAMPLES[mode]`` generated requests for ``operation``; none may be a 5xx."""
    name = f"{operation.method.upper()} {operation.path}"

    @seed(1234)
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case) -> None:
        response = case.call(base_url=url, session=session, timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{name}: {response.status_code} {response.text}"
        if response.status_code >= 400:
            message = response.json()["error"]["message"]
            assert message and "\n" not in message

    call()


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
def test_no_request_gets_a_server_error(
    server: BackgroundServer, operations: dict[str, object], mode: GenerationMode
) -> None:
    session = requests.Session()
    seen: dict[int, int] = {}
    for name, operation in sorted(operations.items()):
        if mode is GenerationMode.NEGATIVE and not name.startswith("POST"):
            continue  # a GET without parameters has nothing to break
        fuzz(operation, mode, server.url, session, seen)
    assert sum(seen.values()) >= EXAMPLES[mode] * 4, seen
    assert any(400 <= status < 500 for status in seen), seen
    if mode is GenerationMode.POSITIVE:
        assert seen.get(200, 0) >= EXAMPLES[mode], seen  # the valid bodies reach the model
