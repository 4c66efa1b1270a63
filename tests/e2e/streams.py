"""Streamed completions through the official openai client, with something killed while every stream is running."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import openai


async def completions_killed_midway(
    c: openai.AsyncOpenAI,
    model: str,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    kill: Callable[[], Awaitable[None]],
    *,
    started_timeout: float,
    done_timeout: float,
) -> list[str]:
    """The greedy streamed texts of `prompts`, with `kill()` awaited once every stream has received 3 chunks (so
    each request is mid-stream when it happens)."""
    received = [0] * len(prompts)
    started = asyncio.Event()

    async def one(i: int) -> str:
        stream = await c.completions.create(
            model=model,
            prompt=list(prompts[i]),
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text = ""
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].text
                received[i] += 1
                if all(n >= 3 for n in received):
                    started.set()
        return text

    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
    await asyncio.wait_for(started.wait(), timeout=started_timeout)
    await kill()
    return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout=done_timeout))
