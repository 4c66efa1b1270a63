"""The `dsv4` command line: one entry point, one subcommand per role of the platform.

Each subcommand names the function that implements it as "module:function"; the module is imported only when the
subcommand runs, so `dsv4 --help` stays fast and never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dsv4.services.supervised import exit_with_supervisor

CHECKPOINT_PRESETS = ("tiny-flash", "tiny-pro", "small-flash", "flash-widths")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="checkpoint folder (default: the embedded tiny model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--redis-url", metavar="URL", help="use this Redis instead of a local one")
    p.add_argument("--api-key-file", metavar="FILE", help="file with one accepted API key per line")
    p.add_argument(
        "--broker",
        choices=("auto", "redis-server", "in-process"),
        default="auto",
        help="Redis to start when no --redis-url: auto = redis-server if installed, else in-process (default: auto)",
    )
    p.add_argument(
        "--prefill-workers", type=_positive, default=1, metavar="N", help="prefill workers to run (default: 1)"
    )
    p.add_argument(
        "--tensor-parallel",
        type=_positive,
        default=1,
        metavar="N",
        help="run each prefill and decode worker as N ranks (gloo processes) splitting the model (default: 1)",
    )
    p.add_argument(
        "--data-parallel",
        type=_positive,
        default=1,
        metavar="M",
        help="data-parallel attention: each worker runs M groups of --tensor-parallel ranks, each group holding "
        "its own sequences' KV, the experts split over all the ranks (default: 1)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=_positive,
        metavar="N",
        help="sequences each engine batches at most, and jobs each worker holds (default: the engine config's, 32)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=_positive,
        metavar="N",
        help="tokens each engine step computes at most, prompt chunks included (default: the engine config's, 512)",
    )
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="compute every prompt from its first token: no prefix cache, shared tier or prefix-aware routing",
    )
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="run the engines' decode steps eagerly instead of replaying captured device graphs (an accelerator)",
    )
    p.add_argument(
        "--no-overlap-scheduling",
        action="store_true",
        help="wait for each step's tokens before launching the next step (CUDA overlaps them by default)",
    )
    p.add_argument(
        "--speculative-mtp",
        action="store_true",
        help="draft one token per decode step with the checkpoint's MTP module and verify it: the same tokens, up "
        "to two per step where drafts are accepted",
    )
    p.add_argument(
        "--prefix-cache-budget",
        type=_non_negative,
        metavar="BYTES",
        help="bytes of prompt prefixes kept in Redis for every prefill worker to import; 0 = none "
        "(default: 1 GiB, or 0 with the in-process broker, which is slow with large values)",
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--redis-url", metavar="URL", help="Redis holding the queues (env DSV4_REDIS_URL)")
    p.add_argument("--api-key-file", metavar="FILE", help="file with one accepted API key per line")


def _worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="checkpoint folder (env DSV4_MODEL)")
    p.add_argument("--redis-url", metavar="URL", help="Redis holding the queues (env DSV4_REDIS_URL)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda:0, npu:0 (default: best available)")


def _operator_args(p: argparse.ArgumentParser) -> None:
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", action="append", metavar="NS", help="namespace to watch (repeatable)")
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace")


def _make_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", choices=CHECKPOINT_PRESETS, default="tiny-flash", help="model shape (default: %(default)s)"
    )
    p.add_argument("--quantized", action="store_true", help="FP8 e4m3 weights and MXFP4 experts, as released")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: %(default)s)")
    p.add_argument("out", metavar="OUT", help="folder to write the checkpoint into")


def _plan_args(p: argparse.ArgumentParser) -> None:
    from dsv4.model_runtime.plan import ACCELERATORS, CONTEXT, KV_FRACTION, MAX_BATCH_TOKENS, MAX_SEQS

    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--config", metavar="PATH", help="a checkpoint's config.json (or the checkpoint folder)")
    model.add_argument("--preset", choices=("flash", "pro"), help="the published DeepSeek-V4 Flash or Pro shapes")
    p.add_argument("--accelerator", required=True, choices=sorted(ACCELERATORS), help="device type of the pods")
    p.add_argument("--devices-per-pod", type=int, default=8, help="devices (ranks) per pod (default: %(default)s)")
    p.add_argument("--pods", type=int, default=1, help="pods per replica group (default: %(default)s)")
    p.add_argument("--tensor", type=int, help="tensor parallel ranks (default: all ranks / --data)")
    p.add_argument("--data", type=int, default=1, help="data-parallel attention groups (default: %(default)s)")
    p.add_argument("--no-expert-parallel", action="store_true", help="split experts by tensor parallel instead")
    p.add_argument("--dtype", default="bfloat16", help="activation dtype (default: %(default)s)")
    p.add_argument("--context", type=int, default=CONTEXT, help="sequence length to count (default: %(default)s)")
    p.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS, help="tokens of one step")
    p.add_argument("--max-seqs", type=int, default=MAX_SEQS, help="sequences of one decode step")
    p.add_argument("--kv-fraction", type=float, default=KV_FRACTION, help="share of free memory for the KV pool")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, its arguments and the "module:function" that runs it."""

    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    target: str


COMMANDS: dict[str, Command] = {
    "serve": Command("run gateway, prefill and decode on this machine", _serve_args, "dsv4.services.serve:run"),
    "gateway": Command("run the OpenAI-compatible gateway", _gateway_args, "dsv4.services.gateway.main:run"),
    "prefill": Command("run a prefill worker", _worker_args, "dsv4.services.workers.main:run_prefill"),
    "decode": Command("run a decode worker", _worker_args, "dsv4.services.workers.main:run_decode"),
    "operator": Command("run the Kubernetes operator", _operator_args, "dsv4.operator.main:main"),
    "plan": Command(
        "will a model fit a parallel layout on an accelerator (exit 1 when it does not)",
        _plan_args,
        "dsv4.model_runtime.plan:main_args",
    ),
    "make-checkpoint": Command(
        "write a small random checkpoint in the official format",
        _make_checkpoint_args,
        "dsv4.model_runtime.make_checkpoint:main",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; exposed so tests and docs can inspect it."""
    parser = argparse.ArgumentParser(prog="dsv4", description="Serve DeepSeek-V4 on Kubernetes or on one machine.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        cmd.add_args(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsv4")
    except PackageNotFoundError:
        return "unknown"


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module_name, _, func_name = target.partition(":")
    func: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module_name), func_name)
    return func


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dsv4` script; returns the process exit status."""
    args = build_parser().parse_args(argv)
    exit_with_supervisor()
    try:
        return _resolve(COMMANDS[args.command].target)(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
