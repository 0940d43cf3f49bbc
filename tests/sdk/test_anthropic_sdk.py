"""Conformance: the official Anthropic Python SDK pointed at Sluice's
Messages API (base URL `<sluice>/anthropic`, as DeepSeek's is
`https://api.deepseek.com/anthropic`).

Messages and streams parse, a streamed message equals the whole one that a
cache hit serves, tools and thinking come through, each Sluice error raises
the SDK's class for it, the SDK waits what `retry-after-ms` says, and an
interrupted stream raises.
"""

import json
import time
import urllib.request

import anthropic
import pytest
from anthropic import Anthropic

from conftest import A_BUDGETED, A_LIMITED, ALPHA, BETA

MODEL = "deepseek-chat"


def client(stack, key=ALPHA, **kw):
    kw.setdefault("max_retries", 0)
    return Anthropic(base_url=stack["base"] + "/anthropic", api_key=key, **kw)


def sim_calls(stack):
    with urllib.request.urlopen(stack["upstream"] + "/sim/stats") as r:
        return json.load(r)["calls"]


def msgs(text):
    return [{"role": "user", "content": text}]


def test_create(stack):
    m = client(stack).messages.create(model=MODEL, max_tokens=256, messages=msgs("anthropic hello"))
    assert m.type == "message" and m.role == "assistant"
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == "This is a simulated answer."
    assert m.stop_reason == "end_turn"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0


def test_bearer_auth_as_claude_code_sends_it(stack):
    c = Anthropic(base_url=stack["base"] + "/anthropic", auth_token=ALPHA, max_retries=0)
    m = c.messages.create(model=MODEL, max_tokens=16, messages=msgs("anthropic bearer"))
    assert m.content[0].text


def test_stream_final_message_equals_the_whole_hit(stack):
    c = client(stack)
    with c.messages.stream(model=MODEL, max_tokens=256, messages=msgs("anthropic streamed")) as s:
        text = "".join(s.text_stream)
        streamed = s.get_final_message()
    assert text == "This is a simulated answer."
    raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=256, messages=msgs("anthropic streamed"))
    assert raw.headers["x-sluice-cache"] == "hit"
    assert raw.parse().model_dump() == streamed.model_dump()
    # And a streamed hit accumulates to the same message again.
    calls = sim_calls(stack)
    with c.messages.stream(model=MODEL, max_tokens=256, messages=msgs("anthropic streamed")) as s:
        again = s.get_final_message()
    assert sim_calls(stack) == calls
    assert again.model_dump() == streamed.model_dump()


def test_tools_and_thinking(stack):
    tools = [{"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    kw = dict(
        model=MODEL,
        max_tokens=2048,
        messages=msgs("anthropic weather?"),
        tools=tools,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    whole = client(stack).messages.create(**kw)
    assert [b.type for b in whole.content] == ["thinking", "text", "tool_use"]
    assert whole.content[0].thinking and whole.content[0].signature
    assert whole.content[2].name == "get_weather"
    assert whole.content[2].input == {"city": "Paris"}
    assert whole.stop_reason == "tool_use"
    # The same request streamed is a hit: its events accumulate to it.
    with client(stack).messages.stream(**kw) as s:
        streamed = s.get_final_message()
    assert streamed.model_dump() == whole.model_dump()
    # A fresh stream (a miss) with thinking and a tool, as it arrives.
    kw["messages"] = msgs("anthropic weather, streamed?")
    with client(stack).messages.stream(**kw) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert "thinking" in kinds and "input_json" in kinds
    assert final.content[2].input == {"city": "Paris"}
    assert final.content[0].signature


def test_count_tokens(stack):
    calls = sim_calls(stack)
    for _ in range(2):
        n = client(stack).messages.count_tokens(model=MODEL, messages=msgs("count me"))
        assert n.input_tokens > 0
    assert sim_calls(stack) == calls + 2, "never cached"


@pytest.mark.parametrize(
    "make, kwargs, cls, status",
    [
        (lambda s: client(s, key="sk-nobody"), {}, anthropic.AuthenticationError, 401),
        (lambda s: client(s), {"max_tokens": 1.5}, anthropic.BadRequestError, 400),
        (lambda s: client(s, key=BETA), {"model": "claude-sonnet-4-5"}, anthropic.PermissionDeniedError, 403),
        (lambda s: client(s), {"messages": msgs("x" * (5 * 1024 * 1024))}, anthropic.ContentTooLargeError, 413),
        (lambda s: Anthropic(base_url=s["dead"] + "/anthropic", api_key=ALPHA, max_retries=0), {}, anthropic.InternalServerError, 502),
    ],
)
def test_error_classes(stack, make, kwargs, cls, status):
    args = dict(model=MODEL, max_tokens=16, messages=msgs("anthropic errors"))
    args.update(kwargs)
    with pytest.raises(cls) as e:
        make(stack).messages.create(**args)
    assert e.value.status_code == status
    assert e.value.body["type"] == "error"
    assert e.value.response.headers["x-sluice-error"]
    assert e.value.body["request_id"] == e.value.response.headers["x-request-id"]


def test_not_found_and_budget_classes(stack):
    with pytest.raises(anthropic.NotFoundError) as e:
        client(stack).models.list()
    assert e.value.body["error"]["type"] == "not_found_error"
    c = client(stack, key=A_BUDGETED)
    # Spend the tiny budget (one answer may overrun it), then be refused.
    for _ in range(2):
        try:
            c.messages.create(model=MODEL, max_tokens=16, messages=msgs(f"budget {time.time()}"))
        except anthropic.PaymentRequiredError as e:
            assert e.body["error"]["type"] == "billing_error"
            assert e.response.headers["x-should-retry"] == "false"
            return
    pytest.fail("the budget was never refused")


def test_upstream_timeout_is_gateway_timeout_error(stack):
    with pytest.raises(anthropic.GatewayTimeoutError) as e:
        client(stack, max_retries=2).messages.create(
            model=MODEL,
            max_tokens=16,
            messages=msgs("anthropic hang"),
            extra_headers={"x-sim-hang": "headers", "cache-control": "no-store"},
        )
    assert e.value.body["error"]["type"] == "timeout_error"
    assert e.value.response.headers["x-sluice-error"] == "upstream_timeout"
    assert e.value.response.headers["x-should-retry"] == "false"


def test_a_401_is_not_retried(stack):
    c = client(stack, key="sk-nobody", max_retries=5)
    start = time.monotonic()
    with pytest.raises(anthropic.AuthenticationError) as e:
        c.messages.create(model=MODEL, max_tokens=16, messages=msgs("no retry"))
    assert e.value.response.headers["x-should-retry"] == "false"
    assert time.monotonic() - start < 0.5, "x-should-retry: false stops the SDK's retries"


def test_rate_limit_retry_waits_retry_after_ms(stack):
    c = client(stack, key=A_LIMITED)
    # Empty the bucket (one request a second, burst 1).
    with pytest.raises(anthropic.RateLimitError) as e:
        for i in range(3):
            c.messages.create(model=MODEL, max_tokens=16, messages=msgs(f"limited {i}"))
    headers = e.value.response.headers
    assert e.value.body["error"]["type"] == "rate_limit_error"
    assert int(headers["retry-after"]) >= 1
    assert headers["anthropic-ratelimit-requests-limit"] == "60"
    assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    # Refused at once, then retried once after retry-after-ms: it passes.
    with pytest.raises(anthropic.RateLimitError) as e:
        c.messages.create(model=MODEL, max_tokens=16, messages=msgs("limited again"))
    wait_ms = int(e.value.response.headers["retry-after-ms"])
    retrying = client(stack, key=A_LIMITED, max_retries=1)
    start = time.monotonic()
    m = retrying.messages.create(model=MODEL, max_tokens=16, messages=msgs("limited retried"))
    took = time.monotonic() - start
    assert m.content[0].text
    assert took >= wait_ms / 1000 * 0.8, f"waited {took:.3f}s for {wait_ms}ms"
    assert took < wait_ms / 1000 + 2.0


def test_an_interrupted_stream_raises(stack):
    c = client(stack)
    with pytest.raises(anthropic.APIError):
        with c.messages.stream(
            model=MODEL,
            max_tokens=256,
            messages=msgs("anthropic interrupted"),
            extra_headers={"x-sim-die-after": "4", "cache-control": "no-store"},
        ) as s:
            for _ in s:
                pass
