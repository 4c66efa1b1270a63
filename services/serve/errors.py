"""How `dsv4 serve` fails: one line for the user, and its exit status."""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class ServeError(RuntimeError):
    """`dsv4 serve` cannot start, a role died, or its broker cannot be kept up; the message is the one line the user
    sees (exit status EXIT_FAILED)."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived before the server was ready (exit status EXIT_INTERRUPTED)."""
