"""Conformance: the official OpenAI Python SDK pointed at Sluice.

Every Sluice answer must look to the SDK exactly like DeepSeek's would:
completions and streams parse, and each Sluice error raises the SDK's
matching exception class.
"""

import json
import time
import urllib.request

import openai
import pytest
from openai import OpenAI

from conftest import ALPHA, BETA, BUDGETED, LIMITED


def client(stack, key=ALPHA, **kw):
    kw.setdefault("max_retries", 0)
    return OpenAI(base_url=stack["base"] + "/v1", api_key=key, **kw)


def sim_calls(stack):
    with urllib.request.urlopen(stack["upstream"] + "/sim/stats") as r:
        return json.load(r)["calls"]


def msgs(text):
    return [{"role": "user", "content": text}]


def test_non_stream(stack):
    r = client(stack).chat.completions.create(model="deepseek-chat", messages=msgs("sdk hello"))
    assert r.choices[0].message.content == "This is a simulated answer."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_and_usage(stack):
    chunks = list(
        client(stack).chat.completions.create(model="deepseek-chat", messages=msgs("sdk stream"), stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "This is a simulated answer."
    assert all(c.usage is None for c in chunks), "no usage chunk unless asked"
    chunks = list(
        client(stack).chat.completions.create(
            model="deepseek-chat",
            messages=msgs("sdk stream usage"),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens > 0


def test_cache_hit_replays_as_stream(stack):
    c = client(stack)
    whole = c.chat.completions.create(model="deepseek-chat", messages=msgs("sdk cached"))
    raw = c.chat.completions.with_raw_response.create(model="deepseek-chat", messages=msgs("sdk cached"), stream=True)
    assert raw.headers["x-sluice-cache"] == "hit"
    text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    assert text == whole.choices[0].message.content


def test_tool_call(stack):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    r = client(stack).chat.completions.create(model="deepseek-chat", messages=msgs("weather?"), tools=tools)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.choices[0].finish_reason == "tool_calls"
    chunks = list(client(stack).chat.completions.create(model="deepseek-chat", messages=msgs("weather stream?"), tools=tools, stream=True))
    args = "".join(
        (c.choices[0].delta.tool_calls or [None])[0].function.arguments or ""
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
    )
    assert json.loads(args) == {"city": "Paris"}


def test_reasoning(stack):
    r = client(stack).chat.completions.create(model="deepseek-reasoner", messages=msgs("think"))
    assert r.choices[0].message.reasoning_content == "Let me think about this."
    assert r.usage.completion_tokens_details.reasoning_tokens == 6
    chunks = list(client(stack).chat.completions.create(model="deepseek-reasoner", messages=msgs("think stream"), stream=True))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert reasoning == "Let me think about this."


def test_fim_on_the_beta_base_url(stack):
    c = OpenAI(base_url=stack["base"] + "/beta", api_key=ALPHA, max_retries=0)
    r = c.completions.create(model="deepseek-chat", prompt="def fib(n):", suffix="    return a")
    assert r.choices[0].text == "This is a simulated answer."


def test_models_filtered(stack):
    assert sorted(m.id for m in client(stack).models.list()) == ["deepseek-chat", "deepseek-reasoner"]
    assert [m.id for m in client(stack, key=BETA).models.list()] == ["deepseek-chat"]


def test_authentication_error(stack):
    with pytest.raises(openai.AuthenticationError) as e:
        client(stack, key="sk-wrong").chat.completions.create(model="deepseek-chat", messages=msgs("x"))
    assert e.value.code == "invalid_api_key"


def test_permission_denied(stack):
    with pytest.raises(openai.PermissionDeniedError) as e:
        client(stack, key=BETA).chat.completions.create(model="deepseek-reasoner", messages=msgs("x"))
    assert e.value.code == "model_not_allowed"


def test_bad_request(stack):
    with pytest.raises(openai.BadRequestError) as e:
        client(stack).post("/chat/completions", body={"model": "deepseek-chat"}, cast_to=object)
    assert e.value.code == "missing_field"


def test_not_found_and_method_not_allowed(stack):
    with pytest.raises(openai.NotFoundError) as e:
        client(stack).post("/nowhere", body={}, cast_to=object)
    assert e.value.code == "not_found"
    with pytest.raises(openai.APIStatusError) as e:
        client(stack).get("/chat/completions", cast_to=object)
    assert e.value.status_code == 405
    assert e.value.code == "method_not_allowed"


def test_body_too_large(stack):
    with pytest.raises(openai.APIStatusError) as e:
        client(stack).chat.completions.create(model="deepseek-chat", messages=msgs("x" * 5_000_000))
    assert e.value.status_code == 413
    assert e.value.code == "body_too_large"


def test_rate_limit_then_sdk_retry_gets_through(stack):
    c = client(stack, key=LIMITED)
    c.chat.completions.create(model="deepseek-chat", messages=msgs("limited 1"))
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="deepseek-chat", messages=msgs("limited 2"))
    assert e.value.code == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1
    # With retries on, the SDK waits what retry-after-ms says and gets through.
    start = time.monotonic()
    c2 = client(stack, key=LIMITED, max_retries=2)
    raw = c2.chat.completions.with_raw_response.create(model="deepseek-chat", messages=msgs("limited 3"))
    assert raw.parse().choices[0].message.content
    assert raw.retries_taken == 1
    assert time.monotonic() - start < 5


def test_upstream_unreachable(stack):
    c = OpenAI(base_url=stack["dead"] + "/v1", api_key=ALPHA, max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model="deepseek-chat", messages=msgs("x"))
    assert e.value.status_code == 502
    assert e.value.code == "upstream_unreachable"


def test_upstream_timeout(stack):
    with pytest.raises(openai.InternalServerError) as e:
        client(stack).chat.completions.create(
            model="deepseek-chat", messages=msgs("hang"), extra_headers={"x-sim-hang": "headers"}
        )
    assert e.value.status_code == 504
    assert e.value.code == "upstream_timeout"


def test_stream_broken_mid_way_raises(stack):
    stream = client(stack).chat.completions.create(
        model="deepseek-chat", messages=msgs("die"), stream=True, extra_headers={"x-sim-die-after": "3"}
    )
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    assert "interrupted" in str(e.value)


def test_insufficient_balance_is_not_retried(stack):
    before = sim_calls(stack)
    with pytest.raises(openai.APIStatusError) as e:
        client(stack, max_retries=2).chat.completions.create(
            model="deepseek-chat", messages=msgs("broke"), extra_headers={"x-sim-status": "402"}
        )
    assert e.value.status_code == 402
    assert e.value.response.headers["x-should-retry"] == "false"
    assert sim_calls(stack) - before == 1, "neither Sluice nor the SDK retried"


def test_budget_exceeded_raises_at_once_without_retry(stack):
    c = client(stack, key=BUDGETED, max_retries=2)
    # Under budget when it starts; its cost overruns the tiny budget.
    c.chat.completions.create(model="deepseek-chat", messages=msgs("budget 1"))
    before = sim_calls(stack)
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="deepseek-chat", messages=msgs("budget 2"))
    assert e.value.status_code == 402
    assert e.value.code == "budget_exceeded"
    assert e.value.type == "insufficient_quota"
    assert e.value.response.headers["x-should-retry"] == "false"
    assert float(e.value.response.headers["x-sluice-budget-remaining-usd"]) == 0
    assert sim_calls(stack) == before, "refused before upstream"
    assert time.monotonic() - start < 2, "the SDK did not retry"
