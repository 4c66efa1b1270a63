"""The real gateway process with the official openai client; the test plays the workers through the queue protocol."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
import redis

from dsv4.model_runtime.chat_tokens import EOS
from dsv4.model_runtime.tokenizer import Tokenizer
from dsv4.protocol import keys
from dsv4.protocol.keys import cancel_key, token_stream_key
from dsv4.services.local_redis import LocalRedis
from dsv4.services.token_stream import TokenWriter
from dsv4.services.work_queue import Job

from .conftest import API_KEY, DEPLOYMENT, MODEL, GatewayProcess, fake_logprobs, write_tokens

pytestmark = pytest.mark.integration

TOK = Tokenizer.from_pretrained()
ANSWER = "Hello from dsv4, 你好 world!"
ANSWER_IDS = TOK.encode(ANSWER + EOS)


_CLIENTS: list[openai.AsyncOpenAI] = []


def client(gw: GatewayProcess, key: str = API_KEY) -> openai.AsyncOpenAI:
    c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)
    _CLIENTS.append(c)
    return c


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _CLIENTS:
        await _CLIENTS.pop().close()


async def answer(job: Job, writer: TokenWriter) -> None:
    await write_tokens(job, writer, ANSWER_IDS)


async def test_chat_stream_delivers_each_token_once_in_order_with_usage(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    side = worker_side(answer)
    stream = await client(gateway).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    [(stream_name, job)] = [(s, j) for s, j in side.jobs if j.request_id == chunks[0].id]
    assert chunks[-1].usage.prompt_tokens == len(job.prompt_ids)
    assert chunks[-1].usage.completion_tokens == len(ANSWER_IDS)
    assert stream_name == keys.DECODE_STREAM  # a short prompt is prefilled by decode
    assert job.prompt_ids == tuple(TOK.encode("<｜begin▁of▁sentence｜><｜User｜>Say hello<｜Assistant｜></think>"))
    assert job.trace_context["traceparent"].startswith("00-")
    assert not redis.Redis.from_url(gateway.redis_url).exists(token_stream_key(DEPLOYMENT, job.request_id))


async def test_chat_non_stream_and_request_id_echo(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    worker_side(answer)
    raw = await client(gateway).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_tokens=5,
        extra_headers={"X-Request-Id": "my-trace-123"},
    )
    assert raw.headers["x-request-id"] == "my-trace-123"
    resp = raw.parse()
    assert resp.choices[0].message.content == TOK.decode(ANSWER_IDS[:5])
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    async with httpx.AsyncClient() as h:
        r = await h.get(gateway.url + "/healthz")
    assert len(r.headers["x-request-id"]) == 32  # generated when the client sends none


def _token_text(token_id: int) -> str:
    return TOK.token_bytes(token_id).decode("utf-8", errors="replace")


async def test_chat_logprobs_streamed_and_whole(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    """Each token's logprob exactly once, in order, with its text, bytes and the asked number of alternatives."""
    side = worker_side(answer)
    messages = [{"role": "user", "content": "Say hello"}]
    stream = await client(gateway).chat.completions.create(
        model=MODEL,
        messages=messages,
        stream=True,
        logprobs=True,
        top_logprobs=2,  # type: ignore[arg-type]
    )
    chunks = [c async for c in stream]
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert [e.token for e in streamed] == [_token_text(t) for t in ANSWER_IDS]
    assert [e.bytes for e in streamed] == [list(TOK.token_bytes(t)) for t in ANSWER_IDS]
    assert [e.logprob for e in streamed] == [fake_logprobs(i, t, 2).logprob for i, t in enumerate(ANSWER_IDS)]
    for i, (e, t) in enumerate(zip(streamed, ANSWER_IDS, strict=True)):
        want = fake_logprobs(i, t, 2).top
        assert [(x.token, x.logprob) for x in e.top_logprobs] == [(_token_text(j), v) for j, v in want]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert {j.sampling.logprobs for _, j in side.jobs} == {2}

    whole = await client(gateway).chat.completions.create(model=MODEL, messages=messages, max_tokens=4, logprobs=True)  # type: ignore[arg-type]
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content is not None
    content = whole.choices[0].logprobs.content
    assert [e.token for e in content] == [_token_text(t) for t in ANSWER_IDS[:4]] and content[0].top_logprobs == []
    plain = await client(gateway).chat.completions.create(model=MODEL, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    assert plain.choices[0].logprobs is None


async def test_a_burst_of_requests_shares_one_queue_stats_refresh(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    worker_side(answer)
    r = redis.Redis.from_url(gateway.redis_url)

    def xlen_calls() -> int:
        return int(r.info("commandstats").get("cmdstat_xlen", {}).get("calls", 0))

    await asyncio.sleep(1.1)  # let the gateway's cached stats expire
    before = xlen_calls()
    c = client(gateway)
    await asyncio.gather(*(c.completions.create(model=MODEL, prompt=f"hi {i}", max_tokens=1) for i in range(16)))
    assert xlen_calls() - before <= 2, "every request of the burst fetched the queue stats itself"


async def test_completion_logprobs_with_offsets(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    worker_side(answer)
    c = client(gateway)
    whole = await c.completions.create(model=MODEL, prompt="Hi", max_tokens=6, logprobs=1)
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.tokens == [_token_text(t) for t in ANSWER_IDS[:6]]
    assert lp.token_logprobs == [fake_logprobs(i, t, 1).logprob for i, t in enumerate(ANSWER_IDS[:6])]
    assert lp.top_logprobs == [{_token_text(t): fake_logprobs(i, t, 1).logprob} for i, t in enumerate(ANSWER_IDS[:6])]
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(6)]
    stream = await c.completions.create(model=MODEL, prompt="Hi", max_tokens=6, logprobs=1, stream=True)
    parts = [ch.choices[0].logprobs for ch in [x async for x in stream] if ch.choices and ch.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens or []] == lp.tokens
    assert [o for p in parts for o in p.text_offset or []] == lp.text_offset


async def test_thinking_mode_and_tool_calls_are_parsed(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    out = (
        "Need the weather.</think>Let me check."
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
    )

    async def respond(job: Job, writer: TokenWriter) -> None:
        await write_tokens(job, writer, TOK.encode(out))

    side = worker_side(respond)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    resp = await client(gateway).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools,  # type: ignore[arg-type]
        extra_body={"thinking": {"type": "enabled"}},
    )
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Let me check."
    assert msg.model_extra is not None and msg.model_extra["reasoning_content"] == "Need the weather."
    assert msg.tool_calls is not None and msg.tool_calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert msg.tool_calls[0].function.arguments == '{"city": "Paris"}'  # type: ignore[union-attr]
    prompt = TOK.decode(side.jobs[-1][1].prompt_ids)
    assert "## Tools" in prompt and prompt.endswith("<｜Assistant｜><think>")


WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
INVOKE_REST = (
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    + EOS
)


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_choice_required_and_named_are_enforced_by_the_prompt(gateway, worker_side, stream: bool) -> None:  # type: ignore[no-untyped-def]
    """The tool-call block is opened in the prompt; the worker's output is parsed as its continuation."""

    async def respond(job: Job, writer: TokenWriter) -> None:
        named = TOK.decode(job.prompt_ids).endswith('<｜DSML｜invoke name="get_time">\n')
        rest = INVOKE_REST if named else '<｜DSML｜invoke name="get_weather">\n' + INVOKE_REST
        await write_tokens(job, writer, TOK.encode(rest))

    side = worker_side(respond)
    c = client(gateway)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for choice, name in [
        ("required", "get_weather"),
        ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
    ]:
        resp = await c.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=WEATHER_TOOLS,
            tool_choice=choice,
            stream=stream,  # type: ignore[arg-type]
        )
        if stream:
            chunks = [ch async for ch in resp]  # type: ignore[union-attr]
            calls = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        else:
            calls = resp.choices[0].message.tool_calls or []  # type: ignore[union-attr]
            finish = [resp.choices[0].finish_reason]  # type: ignore[union-attr]
            content = resp.choices[0].message.content or ""  # type: ignore[union-attr]
        assert [(tc.function.name, tc.function.arguments) for tc in calls] == [(name, '{"city": "Paris"}')]  # type: ignore[union-attr]
        assert finish == ["tool_calls"] and content == ""
        prompt = TOK.decode(side.jobs[-1][1].prompt_ids)
        assert prompt.endswith(
            "<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n"
            + ("" if name == "get_weather" else '<｜DSML｜invoke name="get_time">\n')
        )

    with pytest.raises(openai.BadRequestError) as e:
        await c.chat.completions.create(
            model=MODEL, messages=messages, tools=WEATHER_TOOLS, tool_choice="required",  # type: ignore[arg-type]
            extra_body={"thinking": {"type": "enabled"}},
        )  # fmt: skip
    assert e.value.body["param"] == "tool_choice" and "thinking mode" in e.value.body["message"]  # type: ignore[index]


async def test_stop_string_cuts_the_text_and_cancels_the_workers(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    side = worker_side(answer)
    resp = await client(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stop=["dsv4"]
    )
    assert resp.choices[0].message.content == "Hello from "
    assert resp.choices[0].finish_reason == "stop"
    rid = side.jobs[-1][1].request_id
    assert redis.Redis.from_url(gateway.redis_url).exists(cancel_key(DEPLOYMENT, rid))


async def test_completions_text_and_token_prompts(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    side = worker_side(answer)
    c = client(gateway)
    resp = await c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=50)
    assert resp.choices[0].text == ANSWER  # the EOS text is a special token: skipped in plain completions
    assert side.jobs[-1][1].prompt_ids == tuple(TOK.encode("Once upon a time"))
    stream = await c.completions.create(model=MODEL, prompt=[5, 6, 7], stream=True, max_tokens=3)
    text = "".join([ch.choices[0].text async for ch in stream if ch.choices])
    assert text == TOK.decode(ANSWER_IDS[:3])
    assert side.jobs[-1][1].prompt_ids == (5, 6, 7) and side.jobs[-1][1].sampling.max_tokens == 3


async def test_logit_bias_travels_in_the_job_and_bad_ones_get_400(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    side = worker_side(answer)
    c = client(gateway)
    await c.completions.create(model=MODEL, prompt="hi", max_tokens=2, logit_bias={"17": 100, "5": -2.5})
    assert side.jobs[-1][1].sampling.logit_bias == ((5, -2.5), (17, 100.0))
    bad = [
        ({"abc": 1}, "String should match pattern", "logit_bias.abc.[key]"),
        ({"5": 101}, "less than or equal to 100", "logit_bias.5"),
        ({str(TOK.vocab_size): 1}, "outside the vocabulary", "logit_bias"),
    ]
    for bias, message, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], logit_bias=bias  # type: ignore[arg-type]
            )
        assert message in e.value.message and e.value.param == param, e.value.body


async def by_seed(job: Job, writer: TokenWriter) -> None:
    """Answers "seed <seed>" (a choice's seed tells it apart), then EOS."""
    await write_tokens(job, writer, TOK.encode(f"seed {job.sampling.seed}" + EOS))


async def test_n_choices_fan_out_with_their_seeds_and_one_usage(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    """n = 3: three queue requests (ids <response id>-0..2, seeds 10..12), three choices in index order, the prompt
    counted once in the usage; streamed, each choice's chunks carry its index, and one usage chunk ends it."""
    side = worker_side(by_seed)
    c = client(gateway)
    messages = [{"role": "user", "content": "hi"}]
    resp = await c.chat.completions.create(model=MODEL, messages=messages, n=3, seed=10)  # type: ignore[arg-type]
    assert [(ch.index, ch.message.content, ch.finish_reason) for ch in resp.choices] == [
        (i, f"seed {10 + i}", "stop") for i in range(3)
    ]
    jobs = [job for _, job in side.jobs[-3:]]
    assert sorted(job.request_id for job in jobs) == [f"{resp.id}-{i}" for i in range(3)]
    assert sorted(job.sampling.seed for job in jobs) == [10, 11, 12]  # type: ignore[type-var]
    prompt = len(jobs[0].prompt_ids)
    completion = sum(len(TOK.encode(f"seed {10 + i}" + EOS)) for i in range(3))
    assert resp.usage is not None and (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt, completion)

    stream = await c.chat.completions.create(
        model=MODEL, messages=messages, n=2, seed=4, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
    )
    texts, finishes, usages = {0: "", 1: ""}, {}, []
    async for chunk in stream:
        assert chunk.id == stream_id if (stream_id := chunk.id) else True
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert texts == {0: "seed 4", 1: "seed 5"} and finishes == {0: "stop", 1: "stop"}
    assert len(usages) == 1 and usages[0].prompt_tokens == prompt


async def test_batched_prompts_with_n_and_echo(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    """Two prompts (texts, then token ids) with n = 2: four choices, prompt by prompt, each echoing its prompt
    before its text; every prompt counted once in the usage."""
    side = worker_side(by_seed)
    c = client(gateway)
    resp = await c.completions.create(model=MODEL, prompt=["Once", "upon a"], n=2, seed=0, echo=True, max_tokens=9)
    assert [ch.index for ch in resp.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in resp.choices] == ["Onceseed 0", "Onceseed 1", "upon aseed 0", "upon aseed 1"]
    assert resp.usage is not None and resp.usage.prompt_tokens == len(TOK.encode("Once")) + len(TOK.encode("upon a"))
    ids = [[5, 6, 7], [8, 9]]
    resp = await c.completions.create(model=MODEL, prompt=ids, max_tokens=9)
    assert [ch.text for ch in resp.choices] == ["seed None"] * 2  # unseeded: the engine draws each one's seed
    assert sorted(job.prompt_ids for _, job in side.jobs[-2:]) == [(5, 6, 7), (8, 9)]
    # 128 choices in flight at once, each holding a Redis connection while it waits for its tokens: more than
    # redis-py's default pool of 100 (the gateway's is `redis_max_connections`)
    resp = await c.completions.create(model=MODEL, prompt=["a", "b"], n=64, seed=0, max_tokens=9)
    assert [ch.text for ch in resp.choices] == [f"seed {j}" for _ in range(2) for j in range(64)]
    with pytest.raises(openai.BadRequestError) as e:
        await c.completions.create(model=MODEL, prompt=["a", "b", "c"], n=64)
    assert "at most 128 choices" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        await c.completions.create(model=MODEL, prompt=["a", "b"], echo=True, logprobs=1)
    assert "echo with logprobs" in e.value.message


async def test_a_failing_choice_fails_the_request_and_cancels_the_others(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    """Every choice has its first token; then choice 1's worker fails: the request is that error, and the other
    two choices' workers, still generating, are told to cancel."""
    later: list[asyncio.Task[None]] = []

    async def one_fails(job: Job, writer: TokenWriter) -> None:
        await writer.write(0, TOK.encode("partial"))
        if job.request_id.endswith("-1"):

            async def fail() -> None:
                await asyncio.sleep(1.0)  # the other choices are read and opened by then
                await writer.fail("engine out of memory", "engine_error")

            later.append(asyncio.create_task(fail()))

    async def finished(status: str) -> float:
        async with httpx.AsyncClient() as h:
            text = (await h.get(gateway.url + "/metrics")).text
        line = f'dsv4_requests_total{{endpoint="/v1/chat/completions",status="{status}"}} '
        return sum(float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line))

    before = {status: await finished(status) for status in ("500", "499")}
    side = worker_side(one_fails)
    with pytest.raises(openai.InternalServerError) as e:
        await client(gateway).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3  # type: ignore[arg-type]
        )
    assert "engine out of memory" in str(e.value)
    # every choice's call is finished once: the failed one with its error, the two cut short as 499
    assert {status: await finished(status) - before[status] for status in before} == {"500": 1, "499": 2}
    ids = [job.request_id for _, job in side.jobs[-3:]]
    assert sorted(rid[-2:] for rid in ids) == ["-0", "-1", "-2"] and len({rid[:-2] for rid in ids}) == 1
    r = redis.Redis.from_url(gateway.redis_url)
    assert all(r.exists(cancel_key(DEPLOYMENT, rid)) for rid in ids)  # the failed one's too, as for any failure


async def test_tokenize_gives_the_ids_a_request_would_send_and_detokenize_reverses(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    """vLLM's /tokenize: a chat's ids are exactly the prompt the chat completion enqueues (tools and a forced tool
    call included), a text's are the tokenizer's; /detokenize gives the text back; bad ids and models are refused."""
    side = worker_side(answer)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    await client(gateway).chat.completions.create(**chat, max_tokens=3)  # type: ignore[call-overload]
    async with httpx.AsyncClient(base_url=gateway.url, headers=auth) as h:
        tokenized = (await h.post("/tokenize", json=chat)).json()
        assert tokenized["tokens"] == list(side.jobs[-1][1].prompt_ids)
        assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 1 << 20
        text = (await h.post("/tokenize", json={"model": MODEL, "prompt": "Once upon a time"})).json()
        assert text["tokens"] == TOK.encode("Once upon a time")
        back = (await h.post("/detokenize", json={"model": MODEL, "tokens": text["tokens"]})).json()
        assert back == {"prompt": "Once upon a time"}
        r = await h.post("/detokenize", json={"model": MODEL, "tokens": [TOK.vocab_size]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
        r = await h.post("/tokenize", json={"model": "gpt-4", "prompt": "x"})
        assert r.status_code == 404
        r = await h.post("/tokenize", json={"model": MODEL, "prompt": "x"}, headers={"Authorization": "Bearer no"})
        assert r.status_code == 401


async def test_long_prompt_goes_to_the_prefill_pool(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    side = worker_side(answer)  # its consumer in the prefill group makes prefill workers visible
    long_text = "tell me a story " * 40
    await client(gateway).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    await client(gateway).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_text}])
    assert [s for s, _ in side.jobs[-2:]] == [keys.DECODE_STREAM, keys.PREFILL_STREAM]
    async with httpx.AsyncClient() as h:
        text = (await h.get(gateway.url + "/metrics")).text
    assert 'dsv4_prefill_decisions_total{placement="disaggregated",reason="long_prompt"}' in text
    assert "dsv4_time_to_first_token_seconds_count" in text


async def test_models_and_auth(gateway) -> None:  # type: ignore[no-untyped-def]
    models = await client(gateway, "sk-second").models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra == {"max_model_len": 1 << 20}  # DeepSeek-V4's context, the default
    with pytest.raises(openai.AuthenticationError) as e:
        await client(gateway, "wrong").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert e.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    async with httpx.AsyncClient() as h:
        r = await h.post(gateway.url + "/v1/chat/completions", json={})  # no key at all: 401 before validation
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 9}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 65}, 400, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, None),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            400,
            "top_logprobs",
        ),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            400,
            None,
        ),
    ],
)
async def test_malformed_requests_get_openai_style_4xx(gateway, body: dict, status: int, param: str | None) -> None:  # type: ignore[no-untyped-def,type-arg]
    async with httpx.AsyncClient() as h:
        r = await h.post(
            gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        )
    assert r.status_code == status, r.text
    assert len(r.headers["x-request-id"]) == 32  # errors carry a request id too
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    assert err["param"] == param


async def test_invalid_json_and_unknown_route(gateway) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient() as h:
        auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        r = await h.post(gateway.url + "/v1/chat/completions", content=b"{nope", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = await h.get(gateway.url + "/v1/nothing-here", headers=auth)
        assert r.status_code == 404 and "error" in r.json()


async def test_worker_error_and_silence_become_5xx(gateway, worker_side) -> None:  # type: ignore[no-untyped-def]
    async def fail(job: Job, writer: TokenWriter) -> None:
        await writer.fail("engine out of memory", "engine_error")

    worker_side(fail)
    with pytest.raises(openai.InternalServerError) as e:
        await client(gateway).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "engine out of memory" in str(e.value)


async def test_no_worker_times_out_with_504(gateway) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        await client(gateway).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 504 and time.monotonic() - t0 < 10


async def test_redis_down_answers_503_with_retry_after_then_recovers(redis_server: LocalRedis, worker_side) -> None:  # type: ignore[no-untyped-def]
    gw = GatewayProcess(redis_server.url)
    await asyncio.to_thread(gw.start)
    try:
        async with httpx.AsyncClient(timeout=20) as h:
            assert (await h.get(gw.url + "/readyz")).status_code == 200
            redis_server.kill()
            t0 = time.monotonic()
            r = await h.post(
                gw.url + "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "service_unavailable_error"
            assert time.monotonic() - t0 < 10
            assert (await h.get(gw.url + "/readyz")).status_code == 503
            redis_server.start()
            assert (await h.get(gw.url + "/readyz")).status_code == 200
    finally:
        await asyncio.to_thread(gw.stop)


async def test_a_request_the_restarted_redis_lost_gets_503_not_504(redis_server: LocalRedis) -> None:
    """No worker answers, Redis restarts empty under the waiting request: its lease is gone, so the client gets a
    503 to retry (not the 504 of the 3 s token timeout, which would mean the gateway kept waiting)."""
    gw = GatewayProcess(redis_server.url)
    await asyncio.to_thread(gw.start)
    try:
        async with httpx.AsyncClient(timeout=20) as h:
            pending = asyncio.create_task(
                h.post(
                    gw.url + "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {API_KEY}"},
                )
            )
            sync = redis.Redis.from_url(redis_server.url)
            while not sync.keys("*lease*"):  # the request is enqueued and waiting for tokens
                await asyncio.sleep(0.02)
            redis_server.kill()
            redis_server.start()
            r = await pending
            assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
            assert "lost this request" in r.json()["error"]["message"]
    finally:
        await asyncio.to_thread(gw.stop)
