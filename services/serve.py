"""`dsv4 serve`: the gateway, one prefill and one decode worker, and their Redis, on this machine.

The roles run as the same `dsv4 gateway|prefill|decode` processes a Kubernetes deployment runs (docs/serving.md says
why processes); this process supervises them. It checks what it can before starting anything (port, model, API-key
file, Redis), makes the embedded default model on first use, starts Redis (a private `redis-server`, the in-process
broker, or the `--redis-url` one), starts the roles, waits until every one answers `/readyz`, and prints how to call
the server. SIGINT or SIGTERM stops the roles in order (the gateway lets open streams finish, the workers drain),
then Redis; a role that dies stops the rest. Exit status: 0 after a run ended by a signal, 1 when it could not start
or a role died, 130 when interrupted before it was ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx

from dsv4.protocol import contract, env
from dsv4.services.local_redis import LocalRedis, RedisServerError, free_port, redis_server_binary
from dsv4.services.supervised import supervised_env

EMBEDDED_PRESET = "tiny-flash"
READY_TIMEOUT_S = 600.0  # a real checkpoint can take minutes to load; the tiny one takes seconds
STOP_GRACE_S = 40.0  # the gateway gives open streams 30 s, the workers drain for DRAIN_TIMEOUT_S
DRAIN_TIMEOUT_S = "20"
REDIS_CHECK_TIMEOUT_S = 5.0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class ServeError(RuntimeError):
    """`dsv4 serve` cannot start or a role died; the message is the one line the user sees."""


# ----------------------------------------------------------------------------------------------------- the model


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


# ------------------------------------------------------------------------------------------------ pre-flight checks


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
    from dsv4.protocol.connection import connect

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


# ------------------------------------------------------------------------------------------------------- the broker


class Broker(Protocol):
    """What `dsv4 serve` needs of its Redis: LocalRedis and InProcessBroker both have it."""

    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...


@dataclass
class _External:
    """A Redis someone else runs (`--redis-url`): nothing to stop."""

    url: str

    def stop(self) -> None:
        pass


@dataclass(frozen=True)
class RedisForRoles:
    """The Redis the roles share, how to describe it, and whether it is the in-process broker."""

    server: Broker
    description: str
    in_process: bool = False


def start_broker(choice: str, redis_url: str | None) -> RedisForRoles:
    """The `--redis-url` Redis (checked), else the broker `choice` names: `auto` = a private `redis-server` when
    one is installed, else the in-process broker."""
    if redis_url:
        if choice != "auto":
            raise ServeError("--redis-url and --broker exclude each other")
        check_redis(redis_url)
        return RedisForRoles(_External(redis_url), f"Redis at {redact(redis_url)}")
    if choice == "redis-server" or (choice == "auto" and redis_server_binary() is not None):
        try:
            server = LocalRedis(bound_to_this_process=True).start()
        except RedisServerError as e:
            raise ServeError(f"cannot start redis-server: {e}".splitlines()[0]) from e
        return RedisForRoles(server, f"redis-server on {server.host}:{server.port}")
    from dsv4.services.broker import InProcessBroker  # fakeredis is imported only when it is used

    try:
        broker = InProcessBroker().start()
    except RedisServerError as e:
        raise ServeError(str(e)) from e
    why = " (no redis-server installed)" if choice == "auto" else ""
    return RedisForRoles(broker, f"in-process broker on {broker.host}:{broker.port}{why}", in_process=True)


# -------------------------------------------------------------------------------------------------------- the roles


@dataclass
class Role:
    """One `dsv4 <role>` child process; its log goes to `log_path`."""

    name: str
    args: list[str]
    env: dict[str, str]
    ready_url: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            # Its own process group: a terminal's Ctrl-C reaches only the supervisor, which stops the roles in order.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dsv4.services.cli", self.name, *self.args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
            )

    @property
    def title(self) -> str:
        return self.name if self.name == contract.Role.GATEWAY.value else f"{self.name} worker"

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def last_error(self) -> str:
        """The most telling line of the log: the last one naming an error, else the last one."""
        lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        return (errors or lines or ["(empty log)"])[-1]


def role_processes(
    args: argparse.Namespace, model: Path, redis_url: str, in_process_broker: bool, log_dir: Path
) -> list[Role]:
    """The gateway, one prefill and one decode worker, configured for this machine."""
    base = supervised_env()
    base[env.MODEL] = str(model)  # the gateway reads the checkpoint's tokenizer
    workers = dict(base)
    # Two engines share the cores: give each half, unless the user chose (torch reads OMP_NUM_THREADS).
    workers.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    workers.setdefault(env.DRAIN_TIMEOUT_S, DRAIN_TIMEOUT_S)
    workers.setdefault(env.HOST, "127.0.0.1")
    workers.setdefault(env.POD_IP, "127.0.0.1")
    if in_process_broker:
        # The broker is slow with multi-MiB values: KV state goes worker to worker, Redis carries the descriptor.
        workers.setdefault(f"{env.KV_HANDOFF}__TRANSPORT", "direct")
    gateway_args = ["--host", args.host, "--port", str(args.port), "--redis-url", redis_url]
    if args.api_key_file:
        gateway_args += ["--api-key-file", str(Path(args.api_key_file).resolve())]
    roles = [Role("gateway", gateway_args, base, _http_url(args.host, args.port), log_dir / "gateway.log")]
    for name in (contract.Role.PREFILL.value, contract.Role.DECODE.value):
        port = free_port()
        role_env = {**workers, env.PORT: str(port), env.POD_NAME: f"{name}-local-{port}"}
        ready = f"http://127.0.0.1:{port}"
        roles.append(Role(name, ["--redis-url", redis_url], role_env, ready, log_dir / f"{name}.log"))
    return roles


def _http_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def wait_ready(roles: list[Role], timeout: float, check: Callable[[], None]) -> None:
    """Return once every role answers 200 on /readyz; ServeError when one exits or the time runs out (`check` is
    called while waiting and may raise)."""
    deadline = time.monotonic() + timeout
    waiting = list(roles)
    with httpx.Client(timeout=1.0) as http:
        while waiting:
            check()
            for role in list(waiting):
                code = role.exited()
                if code is not None:
                    raise ServeError(f"the {role.title} exited with status {code} while starting: {role.last_error()}")
                try:
                    if http.get(role.ready_url + contract.READY_PATH).status_code == 200:
                        waiting.remove(role)
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                names = ", ".join(r.name for r in waiting)
                raise ServeError(f"not ready after {timeout:.0f} s: {names} (logs in {roles[0].log_path.parent})")
            if waiting:
                time.sleep(0.1)


def stop_roles(roles: list[Role], grace: float, forced: Callable[[], bool]) -> None:
    """SIGTERM every running role, wait up to `grace` (less once `forced()`), then SIGKILL what is left."""
    running = [r for r in roles if r.proc is not None and r.proc.poll() is None]
    for r in running:
        assert r.proc is not None
        r.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(r.proc is not None and r.proc.poll() is None for r in running):
        if time.monotonic() > deadline or forced():
            break
        time.sleep(0.05)
    for r in running:
        assert r.proc is not None
        if r.proc.poll() is None:
            r.proc.kill()
        r.proc.wait()


# -------------------------------------------------------------------------------------------------------- signals


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived before the server was ready."""


class _Signals:
    """Counts SIGINT/SIGTERM. Nothing is interrupted in the middle: the start-up steps call `check()` between
    steps and in their waits (an exception raised inside an import or a write would leave half-done state)."""

    def __init__(self) -> None:
        self.count = 0

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1

    def check(self) -> None:
        if self.count:
            raise Interrupted

    @contextmanager
    def installed(self) -> Iterator[_Signals]:
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


# ------------------------------------------------------------------------------------------------------- printing


def _say(line: str) -> None:
    print(line, flush=True)


def banner(url: str, model_name: str, model_desc: str, broker_desc: str, roles: list[Role], ready_s: float,
           key_file: str | None) -> str:  # fmt: skip
    """What `dsv4 serve` prints once it is ready: the URL and how to call it (curl and openai-python)."""
    auth_curl = ' \\\n    -H "Authorization: Bearer $OPENAI_API_KEY"' if key_file else ""
    api_key = 'os.environ["OPENAI_API_KEY"]' if key_file else '"none"'
    body = json.dumps({"model": model_name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    metrics = ", ".join(f"{r.ready_url}{contract.METRICS_PATH} ({r.name})" for r in roles)
    lines = [
        f"dsv4 serve: ready in {ready_s:.1f} s at {url}/v1",
        f"  model    {model_name}: {model_desc}",
        f"  redis    {broker_desc}",
        f"  metrics  {metrics}",
        f"  logs     {roles[0].log_path.parent}/{{gateway,prefill,decode}}.log",
    ]
    if key_file:
        lines.append(f"  auth     export OPENAI_API_KEY=<a key from {key_file}>")
    lines += [
        "",
        "curl:",
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth_curl} \\",
        f"    -d '{body}'",
        "",
        "openai-python:",
        "  python - <<'EOF'",
        *(["  import os"] if key_file else []),
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{url}/v1", api_key={api_key})',
        "  stream = client.chat.completions.create(",
        f'      model="{model_name}", messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=32, stream=True)',
        "  for chunk in stream:",
        '      print(chunk.choices[0].delta.content or "", end="", flush=True)',
        "  print()",
        "  EOF",
        "",
        "Ctrl-C stops the server.",
    ]
    return "\n".join(lines)


def _served_model_name() -> str:
    from dsv4.services.gateway.settings import GatewaySettings

    return GatewaySettings().served_model_name


# ------------------------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> int:
    """Entry point of `dsv4 serve`."""
    started = time.monotonic()
    roles: list[Role] = []
    broker: Broker | None = None
    signals = _Signals()
    with signals.installed():
        try:
            check_port_free(args.host, args.port)
            if args.api_key_file and not Path(args.api_key_file).is_file():
                raise ServeError(f"--api-key-file {args.api_key_file}: no such file")
            if args.model:
                model = Path(args.model).expanduser().resolve()
                check_model_dir(model)
                model_desc = str(model)
            redis = start_broker(args.broker, args.redis_url)
            broker = redis.server
            if not args.model:
                model = ensure_embedded_model(_say, signals.check)
                model_desc = f"the embedded {EMBEDDED_PRESET} checkpoint with random weights ({model})"
            signals.check()
            log_dir = dsv4_home() / "logs" / f"serve-{args.port}"
            log_dir.mkdir(parents=True, exist_ok=True)
            roles = role_processes(args, model, redis.server.url, redis.in_process, log_dir)
            _say(f"dsv4 serve: starting gateway, prefill and decode on {redis.description}…")
            for role in roles:
                role.start()
            wait_ready(roles, READY_TIMEOUT_S, signals.check)
            url = _http_url(args.host, args.port)
            ready_s = time.monotonic() - started
            _say(banner(url, _served_model_name(), model_desc, redis.description, roles, ready_s, args.api_key_file))
            status = _supervise(roles, signals)
        except ServeError as e:
            print(f"dsv4 serve: {e}", file=sys.stderr, flush=True)
            status = EXIT_FAILED
        except Interrupted:
            print("dsv4 serve: interrupted before it was ready", file=sys.stderr, flush=True)
            status = EXIT_INTERRUPTED
        finally:
            if roles:
                _say("dsv4 serve: stopping (open requests may finish; Ctrl-C again to stop at once)…")
            stop_roles(roles, STOP_GRACE_S, lambda: signals.count >= 2)
            if broker is not None:
                broker.stop()
    if roles:
        _say("dsv4 serve: stopped")
    return status


def _supervise(roles: list[Role], signals: _Signals) -> int:
    """Wait for a signal (status 0) or for a role to die (status 1)."""
    while signals.count == 0:
        for role in roles:
            code = role.exited()
            if code is not None:
                print(f"dsv4 serve: the {role.title} exited with status {code}: {role.last_error()}; stopping",
                      file=sys.stderr, flush=True)  # fmt: skip
                return EXIT_FAILED
        time.sleep(0.2)
    return 0
