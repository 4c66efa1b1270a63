"""`dsv4 operator`: run the kopf operator over the watched namespaces."""

from __future__ import annotations

import argparse
import os

import kopf

# Importing the handlers registers them with kopf's default registry.
from dsv4.operator import handlers  # noqa: F401
from dsv4.protocol import env


def main(args: argparse.Namespace) -> int:
    """Run until interrupted. `--namespace` (repeatable) or `--all-namespaces`; else DSV4_WATCH_NAMESPACES; else
    every namespace."""
    namespaces: list[str] = list(args.namespace or [])
    if not namespaces and not args.all_namespaces:
        namespaces = [ns for ns in os.environ.get(env.WATCH_NAMESPACES, "").split(",") if ns.strip()]
    # Every reconcile, planner decision and problem is a Kubernetes Event; the log keeps warnings unless asked.
    verbose = bool(os.environ.get(env.OPERATOR_VERBOSE))
    kopf.configure(verbose=verbose, quiet=not verbose)
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=os.environ.get(env.LIVENESS_ENDPOINT),
    )
    return 0
