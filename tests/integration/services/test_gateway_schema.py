"""Schemathesis fuzzes the real gateway from its own OpenAPI document: no request may produce a 5xx."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from dsv4.model_runtime.chat_tokens import EOS
from dsv4.model_runtime.tokenizer import Tokenizer
from dsv4.services.token_stream import TokenWriter
from dsv4.services.work_queue import Job

from .conftest import API_KEY, write_tokens

pytestmark = pytest.mark.integration

IDS = Tokenizer.from_pretrained().encode("fuzzed answer" + EOS)


async def test_schemathesis_finds_no_server_error(gateway, worker_side, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def respond(job: Job, writer: TokenWriter) -> None:
        await write_tokens(job, writer, IDS, duplicate=False)

    side = worker_side(respond)  # valid requests get answers, so a 504 cannot hide behind "no worker"
    cli = str(Path(sys.executable).with_name("schemathesis"))
    proc = await asyncio.create_subprocess_exec(
        cli, "run", f"{gateway.url}/openapi.json",
        "--header", f"Authorization: Bearer {API_KEY}",
        "--checks", "not_a_server_error",
        "--max-examples", "50",
        "--seed", "7",
        "--workers", "1",
        "--generation-database", "none",
        "--request-timeout", "20",
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=240)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{text}\n--- gateway log ---\n{gateway.log_tail()}"
    assert "Tested: 6" in text and re.search(r"(\d+) generated, \1 passed", text), text
    assert {job.request_id[:5] for _, job in side.jobs} == {"chatc", "cmpl-"}  # fuzzed requests reached the queue
