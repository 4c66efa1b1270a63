"""What `dsv4 serve` checks before it starts anything, and the embedded default model it makes on first use.

Each failed check is a `ServeError` whose message names the flag and what is wrong, so the user reads one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from dsv4.protocol import env
from dsv4.protocol.connection import connect
from dsv4.services.serve.errors import ServeError
from dsv4.services.supervised import supervised_env

EMBEDDED_PRESET = "tiny-flash"
REDIS_CHECK_TIMEOUT_S = 5.0


def dsv4_home() -> Path:
    """`$DSV4_HOME`, else `~/.cache/dsv4`: where `dsv4 serve` keeps the embedded model and its logs."""
    return Path(os.environ.get(env.HOME) or Path.home() / ".cache" / "dsv4")


def embedded_model_dir() -> Path:
    """Folder of the embedded default model (made on first use)."""
    return dsv4_home() / "models" / EMBEDDED_PRESET


def ensure_embedded_model(say: Callable[[str], None], check: Callable[[], None]) -> Path:
    """The embedded default model, written on first use by `dsv4 make-checkpoint` into a temporary folder that is
    renamed into place, so an interrupted first run never leaves a half checkpoint where the next run looks.

    The writer is a child process: a signal stops it cleanly (`check` raises), and this process never imports torch.
    """
    final = embedded_model_dir()
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    say(f"writing the embedded model {EMBEDDED_PRESET} to {final} (first run only)…")
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_PRESET}.partial-", dir=final.parent))
    try:
        cmd = ["make-checkpoint", "--preset", EMBEDDED_PRESET, "--quantized", "--seed", "0", str(tmp)]
        writer = subprocess.Popen(
            [sys.executable, "-m", "dsv4.services.cli", *cmd],
            env=supervised_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            process_group=0,
        )
        try:
            while writer.poll() is None:
                check()
                time.sleep(0.1)
        finally:
            if writer.poll() is None:
                writer.kill()
            _, err = writer.communicate()
        if writer.returncode != 0:
            last = (err.strip().splitlines() or ["no output"])[-1]
            raise ServeError(f"could not write the embedded model to {final}: {last}")
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not a concurrent first run that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def check_model_dir(path: Path) -> None:
    """Fail early, in one line, on a folder that cannot be a checkpoint (the loader checks every tensor later)."""
    if not path.is_dir():
        raise ServeError(f"--model {path}: no such folder")
    config = path / "config.json"
    try:
        parsed = json.loads(config.read_text())
    except FileNotFoundError:
        raise ServeError(f"--model {path}: no config.json (not a DeepSeek-V4 checkpoint folder)") from None
    except (OSError, ValueError) as e:
        raise ServeError(f"--model {path}: unreadable config.json ({e})") from e
    if not isinstance(parsed, dict):
        raise ServeError(f"--model {path}: config.json is not a JSON object")
    if not any(path.glob("*.safetensors")):
        raise ServeError(f"--model {path}: no *.safetensors files")


def check_port_free(host: str, port: int) -> None:
    """Raise ServeError when `host`:`port` cannot be listened on (taken, or not an address of this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: cannot resolve ({e})") from e
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "taken"
        try:
            s.bind(addr)
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror} (pick another with --port)") from e


def redact(url: str) -> str:
    """`url` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_redis(url: str) -> None:
    """Raise ServeError unless the Redis at `url` answers PING within a few seconds."""

    async def ping() -> None:
        client = connect(url, os.environ.get(env.REDIS_PASSWORD))
        try:
            await asyncio.wait_for(client.ping(), REDIS_CHECK_TIMEOUT_S)
        finally:
            await client.aclose()

    try:
        asyncio.run(ping())
    except Exception as e:  # any failure (refused, timeout, auth, bad URL) means we cannot serve on it
        raise ServeError(f"cannot reach Redis at {redact(url)}: {type(e).__name__}: {e}") from e
