"""The handle service's OpenAI-compatible ``/v1`` API, with the real SmolLM2-135M GGUF on CPU.

Requests go over real HTTP (aiohttp client) to the API that
:meth:`HandleService.start` opens when ``handle.api_port`` is set. SmolLM2-135M
is tiny and often wrong: these tests check the protocol (shapes, auth,
streaming, validation), never the truth of an answer. The model loads once per
module (module-scoped loop and service).
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from wyoming_superwhisper.handle.engines import LlamaCppEngine
from wyoming_superwhisper.handle.service import HandleService
from wyoming_superwhisper.runtime.worker import EngineWorker

from ..conftest import LOOPBACK, make_context, make_settings, serving

pytestmark = pytest.mark.asyncio(loop_scope="module")

SMOLLM = {"model": "smollm2-135m", "device": "cpu"}
EOS_TOKEN = 2
"""SmolLM2's ``<|im_end|>``: banned where a test needs the answer to run to the token limit."""
API_KEY = "s3cret-test-key"
MAX_CHARS = 100
MEMORY_TURNS = 1
CONVERSATION_LIMIT = MAX_CHARS * (MEMORY_TURNS * 2 + 2)
"""Most characters of content a ``/v1`` conversation may carry (api.py: one transcript's
``max_chars`` for each message a remembered conversation would hold)."""
TIMEOUT = aiohttp.ClientTimeout(total=120)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class Api:
    service: HandleService
    url: str
    """``http://127.0.0.1:<port>/v1``"""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def api() -> AsyncIterator[Api]:
    port = free_port()
    settings = make_settings(
        **{
            "handle.chain": [SMOLLM],
            "handle.max_tokens": 32,
            "handle.max_chars": MAX_CHARS,
            "handle.memory_turns": MEMORY_TURNS,
            "handle.api_host": LOOPBACK,
            "handle.api_port": port,
            "handle.api_key": API_KEY,
        }
    )
    service = HandleService(make_context(settings))
    async with serving(service):
        yield Api(service, f"http://{LOOPBACK}:{port}/v1")


@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


async def chat(client: aiohttp.ClientSession, api: Api, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with client.post(f"{api.url}/chat/completions", json=body, headers=api.auth) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


async def assert_answers(client: aiohttp.ClientSession, api: Api) -> None:
    """A valid request is answered (the server is still serving)."""
    status, body = await chat(client, api, {"messages": QUESTION, "max_tokens": 8})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].strip()


def assert_error(body: dict[str, Any], code: str | None = None) -> None:
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code and error["type"] == code


def requests_counted(api: Api, outcome: str) -> float:
    registry = api.service.context.metrics.registry
    value = registry.get_sample_value(
        "superwhisper_requests_total", {"service": "handle", "outcome": outcome}
    )
    return value or 0.0


# --- /v1/models and auth -------------------------------------------------------------------


async def test_models_lists_the_chain_model(api: Api, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{api.url}/models", headers=api.auth) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["smollm2-135m"]
    assert [m["id"] for m in body["data"]] == [e.model for e in api.service.chain.engines]
    for model in body["data"]:
        assert model["object"] == "model"
        assert isinstance(model["created"], int) and model["created"] > 0
        assert isinstance(model["owned_by"], str)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer wrong-key",
        f"Bearer {API_KEY}x",
        f"Bearer {API_KEY[:-1]}",
        API_KEY,
        f"Basic {API_KEY}",
        f"bearer{API_KEY}",
    ],
    ids=["missing", "empty", "wrong", "longer", "prefix", "no-scheme", "basic", "no-space"],
)
async def test_missing_or_wrong_bearer_token_is_401(
    api: Api, client: aiohttp.ClientSession, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    ok_before = requests_counted(api, "ok")
    async with client.get(f"{api.url}/models", headers=headers) as resp:
        assert resp.status == 401
        assert_error(await resp.json(), "invalid_api_key")
    async with client.post(
        f"{api.url}/chat/completions", json={"messages": QUESTION, "max_tokens": 4}, headers=headers
    ) as resp:
        assert resp.status == 401
        assert_error(await resp.json(), "invalid_api_key")
    assert requests_counted(api, "ok") == ok_before  # nothing was generated


async def test_right_bearer_token_is_accepted(api: Api, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{api.url}/models", headers=api.auth) as resp:
        assert resp.status == 200
    async with client.post(
        f"{api.url}/chat/completions", json={"messages": QUESTION, "max_tokens": 8}, headers=api.auth
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["message"]["content"].strip()


# --- /v1/chat/completions ------------------------------------------------------------------


async def test_chat_completion_is_openai_shaped(api: Api, client: aiohttp.ClientSession) -> None:
    ok_before = requests_counted(api, "ok")
    status, body = await chat(
        client,
        api,
        {
            "model": "whatever-the-client-thinks",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"},
            ],
            "temperature": 0.2,
            "max_tokens": 24,
        },
    )
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert isinstance(body["id"], str) and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int) and body["created"] > 0
    assert body["model"] == "smollm2-135m"
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert isinstance(content, str) and content.strip()
    assert "tool_calls" not in choice["message"]
    assert choice["finish_reason"] in ("stop", "length")
    if "usage" in body:
        usage = body["usage"]
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert isinstance(usage[key], int) and usage[key] >= 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert requests_counted(api, "ok") == ok_before + 1


async def test_max_tokens_reaches_the_model(api: Api, client: aiohttp.ClientSession) -> None:
    engine = api.service.chain.engines[0]
    assert isinstance(engine, EngineWorker) and isinstance(engine.engine, LlamaCppEngine)
    status, body = await chat(
        client,
        api,
        {
            "messages": [{"role": "user", "content": "Write a long story about a dragon and a knight."}],
            "max_tokens": 3,
        },
    )
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"].strip()
    assert 1 <= engine.stats.tokens <= 3


async def test_streamed_answer_is_sse_chunks_ending_with_done(
    api: Api, client: aiohttp.ClientSession
) -> None:
    async with client.post(
        f"{api.url}/chat/completions",
        json={"messages": QUESTION, "stream": True, "max_tokens": 24},
        headers=api.auth,
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        raw = (await resp.read()).decode()
    events = [event for event in raw.split("\n\n") if event]
    assert raw.endswith("\n\n")
    assert all(event.startswith("data: ") for event in events), events
    assert events[-1] == "data: [DONE]"
    assert events.count("data: [DONE]") == 1
    chunks = [json.loads(event[len("data: ") :]) for event in events[:-1]]
    assert len(chunks) >= 2  # at least one piece of text, then the finish
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "smollm2-135m"
        assert len(chunk["choices"]) == 1 and chunk["choices"][0]["index"] == 0
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    finishes = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    assert deltas[0]["role"] == "assistant"
    assert all("role" not in delta for delta in deltas[1:])
    assert finishes[:-1] == [None] * (len(chunks) - 1)
    assert finishes[-1] in ("stop", "length")
    text = "".join(delta.get("content", "") for delta in deltas)
    assert text.strip()
    assert all(delta.get("content") for delta in deltas[:-1])  # no empty pieces


async def test_streamed_and_plain_answers_agree_under_greedy_decoding(
    api: Api, client: aiohttp.ClientSession
) -> None:
    request = {"messages": QUESTION, "max_tokens": 16, "temperature": 0.0, "seed": 1}
    status, plain = await chat(client, api, request)
    assert status == 200, plain
    async with client.post(
        f"{api.url}/chat/completions", json={**request, "stream": True}, headers=api.auth
    ) as resp:
        assert resp.status == 200
        raw = (await resp.read()).decode()
    chunks = [json.loads(e[len("data: ") :]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


# --- bad requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"",
        b"\xff\xfe not utf-8",
        b"[]",
        b'"hello"',
        b"{}",
        b'{"messages": null}',
        b'{"messages": "What is the capital of France?"}',
        b'{"messages": {"role": "user", "content": "hi"}}',
        b'{"messages": []}',
        b'{"messages": ["hi"]}',
        b'{"messages": [{"role": "user", "content": "hi"}, 3]}',
        b'{"messages": [{"content": "hi"}]}',
        b'{"messages": [{"role": null, "content": "hi"}]}',
        b'{"messages": [{"role": 5, "content": "hi"}]}',
        b'{"messages": [{"role": "", "content": "hi"}]}',
        b'{"messages": [{"role": "user", "content": 5}]}',
        b'{"messages": [{"role": "user", "content": {"text": "hi"}}]}',
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}',
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}',
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": true}',
        b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}',
    ],
    ids=[
        "invalid-json",
        "empty-body",
        "not-utf8",
        "array-body",
        "string-body",
        "no-messages",
        "messages-null",
        "messages-string",
        "messages-object",
        "messages-empty",
        "messages-of-strings",
        "messages-mixed",
        "message-without-role",
        "role-null",
        "role-number",
        "role-empty",
        "content-number",
        "content-object",
        "max-tokens-negative",
        "max-tokens-zero",
        "max-tokens-string",
        "max-tokens-float",
        "max-tokens-bool",
        "max-completion-tokens-zero",
    ],
)
async def test_bad_body_is_400_and_the_server_keeps_serving(
    api: Api, client: aiohttp.ClientSession, payload: bytes
) -> None:
    ok_before = requests_counted(api, "ok")
    headers = {**api.auth, "Content-Type": "application/json"}
    async with client.post(f"{api.url}/chat/completions", data=payload, headers=headers) as resp:
        assert resp.status == 400, await resp.text()
        assert resp.content_type == "application/json"
        assert_error(await resp.json(), "invalid_request_error")
    assert requests_counted(api, "ok") == ok_before  # rejected before any generation
    await assert_answers(client, api)


async def test_malformed_messages_never_open_the_circuit(api: Api, client: aiohttp.ClientSession) -> None:
    """A client's bad request is its own fault: it must not count as a model failure."""
    threshold = api.service.settings.failure_threshold
    for _ in range(threshold + 1):
        status, body = await chat(client, api, {"messages": [{"content": "What is the capital of France?"}]})
        assert status == 400, body
        assert_error(body, "invalid_request_error")
    level = api.service.chain.status()[0]
    assert level["circuit"] == "closed", level
    assert api.service.readiness() == (True, "ok")
    await assert_answers(client, api)


async def test_tool_call_history_with_null_content_is_answered(
    api: Api, client: aiohttp.ClientSession
) -> None:
    """Home Assistant replays a tool call as an assistant message whose content is null."""
    call = {"id": "call_1", "type": "function", "function": {"name": "turn_on", "arguments": "{}"}}
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Turn on the light."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    request = {"messages": messages, "max_tokens": 8, "temperature": 0.0}
    status, body = await chat(client, api, request)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].strip()
    del messages[2]["content"]  # content may also be left out when there are tool calls
    status, body = await chat(client, api, request)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].strip()


async def test_one_over_long_message_is_rejected(api: Api, client: aiohttp.ClientSession) -> None:
    content = "Bonjour. " * (CONVERSATION_LIMIT // 9 + 1)
    assert len(content) > CONVERSATION_LIMIT
    status, body = await chat(client, api, {"messages": [{"role": "user", "content": content}]})
    assert status == 400, body
    assert_error(body, "context_length_exceeded")
    await assert_answers(client, api)


async def test_a_conversation_over_the_limit_in_total_is_rejected(
    api: Api, client: aiohttp.ClientSession
) -> None:
    piece = "x" * (MAX_CHARS - 1)  # each message alone is short enough
    roles = ["user", "assistant"] * (CONVERSATION_LIMIT // len(piece) + 1)
    messages = [{"role": role, "content": piece} for role in roles] + [
        {"role": "user", "content": "Et alors ?"}
    ]
    assert sum(len(m["content"]) for m in messages) > CONVERSATION_LIMIT
    status, body = await chat(client, api, {"messages": messages})
    assert status == 400, body
    assert_error(body, "context_length_exceeded")
    await assert_answers(client, api)


async def test_a_conversation_within_the_limit_is_answered(api: Api, client: aiohttp.ClientSession) -> None:
    messages = [
        {"role": "user", "content": "Bonjour !"},
        {"role": "assistant", "content": "Bonjour, que puis-je faire pour vous ?"},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert sum(len(m["content"]) for m in messages) <= CONVERSATION_LIMIT
    status, body = await chat(client, api, {"messages": messages, "max_tokens": 8})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].strip()


async def test_a_body_over_one_mebibyte_is_413(api: Api, client: aiohttp.ClientSession) -> None:
    content = "x" * (1024 * 1024 + 1)
    payload = io.BytesIO(json.dumps({"messages": [{"role": "user", "content": content}]}).encode())
    async with client.post(
        f"{api.url}/chat/completions",
        data=payload,
        headers={**api.auth, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 413
    await assert_answers(client, api)


async def test_unknown_path_and_wrong_method(api: Api, client: aiohttp.ClientSession) -> None:
    async with client.post(f"{api.url}/completions", json={"prompt": "hi"}, headers=api.auth) as resp:
        assert resp.status == 404
    async with client.get(f"{api.url}/chat/completions", headers=api.auth) as resp:
        assert resp.status == 405


# --- limits and lifecycle (a second service with its own settings) ------------------------


async def test_api_max_tokens_caps_the_client_request_and_stop_closes_the_api() -> None:
    """With the end-of-text token banned the model writes until its limit: the cap shows."""
    port = free_port()
    level = {**SMOLLM, "options": {"logit_bias": {str(EOS_TOKEN): -100.0}, "temperature": 1.0}}
    settings = make_settings(
        **{
            "handle.chain": [level],
            "handle.max_tokens": 8,
            "handle.api_max_tokens": 12,
            "handle.stream_holdback_chars": 0,
            "handle.timeout_s": 120,
            "handle.api_host": LOOPBACK,
            "handle.api_port": port,
        }
    )
    service = HandleService(make_context(settings))
    engine = service.chain.engines[0]
    assert isinstance(engine, EngineWorker) and isinstance(engine.engine, LlamaCppEngine)
    url = f"http://{LOOPBACK}:{port}/v1"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
        async with serving(service):
            # no handle.api_key: no Authorization header needed
            async with client.post(
                f"{url}/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "Tell me a very long story."}],
                    "max_tokens": 5000,
                },
            ) as resp:
                assert resp.status == 200
                body = await resp.json()
            assert body["choices"][0]["message"]["content"].strip()
            assert body["choices"][0]["finish_reason"] == "length"
            assert 8 < engine.stats.tokens <= 12
        with pytest.raises(aiohttp.ClientConnectionError):
            async with client.get(f"{url}/models"):
                pass
