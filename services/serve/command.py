"""The flow of `dsv4 serve`: check what it can before starting anything (port, model, API-key file, Redis), make the
embedded default model on first use, start Redis and the roles, wait until every one answers `/readyz`, print how to
call the server, then supervise until SIGINT or SIGTERM, which stops the roles in order and then Redis.

Exit status: 0 after a run ended by a signal, 1 when it could not start, a role died, or its broker could not be
kept up, 130 when interrupted before it was ready.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dsv4.protocol import contract
from dsv4.services.serve.brokers import Broker, BrokerWatch, start_broker
from dsv4.services.serve.errors import EXIT_FAILED, EXIT_INTERRUPTED, Interrupted, ServeError
from dsv4.services.serve.preflight import (
    EMBEDDED_PRESET,
    check_model_dir,
    check_port_free,
    dsv4_home,
    ensure_embedded_model,
)
from dsv4.services.serve.supervisor import (
    RoleProcess,
    Signals,
    http_url,
    role_processes,
    stop_roles,
    supervise,
    wait_ready,
)

READY_TIMEOUT_S = 600.0  # a real checkpoint can take minutes to load; the tiny one takes seconds
STOP_GRACE_S = 40.0  # the gateway gives open streams 30 s, the workers drain for supervisor.DRAIN_TIMEOUT_S


def _say(line: str) -> None:
    print(line, flush=True)


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def banner(url: str, model_name: str, model_desc: str, broker_desc: str, roles: list[RoleProcess], ready_s: float,
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
        f"  logs     {roles[0].log_path.parent}/{{{','.join(r.log_path.stem for r in roles)}}}.log",
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


def run(args: argparse.Namespace) -> int:
    """Entry point of `dsv4 serve`."""
    started = time.monotonic()
    roles: list[RoleProcess] = []
    broker: Broker | None = None
    signals = Signals()
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
            watch = BrokerWatch(redis, _warn)

            def check() -> None:  # between start-up steps: a signal, or a broker that died meanwhile
                signals.check()
                watch.check()

            if not args.model:
                model = ensure_embedded_model(_say, signals.check)
                model_desc = f"the embedded {EMBEDDED_PRESET} checkpoint with random weights ({model})"
            signals.check()
            log_dir = dsv4_home() / "logs" / f"serve-{args.port}"
            log_dir.mkdir(parents=True, exist_ok=True)
            roles = role_processes(args, model, redis.server.url, redis.in_process, log_dir)
            prefill = "prefill" if args.prefill_workers == 1 else f"{args.prefill_workers} prefill workers"
            n = args.tensor_parallel * args.data_parallel
            ranks = f" ({n} ranks each)" if n > 1 else ""
            _say(f"dsv4 serve: starting gateway, {prefill} and decode{ranks} on {redis.description}…")
            for role in roles:
                role.start()
            wait_ready(roles, READY_TIMEOUT_S, check)
            url = http_url(args.host, args.port)
            ready_s = time.monotonic() - started
            _say(banner(url, _served_model_name(), model_desc, redis.description, roles, ready_s, args.api_key_file))
            status = supervise(roles, watch, signals)
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
