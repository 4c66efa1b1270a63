"""`python -m dsv4.operator.prewarm SRC DST`: copy a checkpoint onto node-local storage before the worker starts.

The init container of `model.localCache` runs this (it is in the image with the rest of dsv4, and needs nothing but
the standard library). Network storage (a PVC) is read once per node instead of once per rank process, and the
worker loads from local disk. Progress goes to the pod log every few seconds. The copy resumes: files already
copied with the right size are kept, each file is written under a temporary name and renamed when whole, and a
manifest marks the folder complete, so a restarted pod on the same node starts at once. Pods sharing a node cache
copy one at a time (a lock file).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

COMPLETE = ".dsv4-complete.json"
LOCK = ".dsv4-lock"
PARTIAL = ".partial"
CHUNK_BYTES = 16 << 20
REPORT_EVERY_S = 5.0
GIB = 1 << 30


class PrewarmError(RuntimeError):
    """The copy cannot be made (missing source, unwritable target); the message says which and why."""


@dataclass(frozen=True)
class Entry:
    """One file of the checkpoint."""

    path: str  # relative to the source
    size: int


def manifest(src: Path) -> list[Entry]:
    """Every file under `src` (symlinks followed, as a mounted volume presents them), in a stable order."""
    if not src.is_dir():
        raise PrewarmError(f"source {src} is not a folder: is the model volume mounted?")
    out = []
    for root, _, files in os.walk(src, followlinks=True):
        for name in files:
            full = Path(root) / name
            rel = str(full.relative_to(src))
            if rel.startswith("..") or name.endswith(PARTIAL):
                continue
            out.append(Entry(rel, full.stat().st_size))
    if not out:
        raise PrewarmError(f"source {src} holds no files: is the model volume the checkpoint folder?")
    return sorted(out, key=lambda e: e.path)


def _manifest_json(entries: list[Entry]) -> str:
    return json.dumps([[e.path, e.size] for e in entries])


def is_complete(dst: Path, entries: list[Entry]) -> bool:
    """Whether `dst` already holds exactly this checkpoint (a previous pod on this node copied it)."""
    marker = dst / COMPLETE
    return marker.is_file() and marker.read_text() == _manifest_json(entries)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Byte counts reported to the log at most every REPORT_EVERY_S seconds."""

    def __init__(self, total: int, files: int, say: Callable[[str], None], clock: Callable[[], float]) -> None:
        self.total, self.files, self.say, self.clock = total, files, say, clock
        self.done = 0
        self.files_done = 0
        self.copied = 0  # bytes actually copied (not skipped), for the rate
        self.start = self.last = clock()

    def add(self, n: int, copied: bool = True) -> None:
        """Account for `n` more bytes in place; report when due."""
        self.done += n
        if copied:
            self.copied += n
        now = self.clock()
        if now - self.last >= REPORT_EVERY_S:
            self.last = now
            self.report()

    def report(self) -> None:
        """One progress line: bytes, percent, rate, time left, files."""
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.copied / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        self.say(
            f"prewarm: {self.done / GIB:.2f}/{self.total / GIB:.2f} GiB ({pct:.1f}%), "
            f"{rate / GIB:.2f} GiB/s, eta {_duration(left)}, {self.files_done}/{self.files} files"
        )


def _copy_file(src: Path, dst: Path, progress: Progress) -> None:
    partial = dst.with_name(dst.name + PARTIAL)
    with src.open("rb") as fin, partial.open("wb") as fout:
        while chunk := fin.read(CHUNK_BYTES):
            fout.write(chunk)
            progress.add(len(chunk))
    os.replace(partial, dst)


@contextmanager
def _locked(dst: Path, say: Callable[[str], None]) -> Iterator[None]:
    with (dst / LOCK).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"prewarm: another pod on this node is copying into {dst}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prewarm(
    src: Path, dst: Path, say: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic
) -> Progress:
    """Copy `src` into `dst` (resuming), then mark `dst` complete. Returns the final progress."""
    entries = manifest(src)
    total = sum(e.size for e in entries)
    try:
        dst.mkdir(parents=True, exist_ok=True)
        probe = dst / f".dsv4-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PrewarmError(
            f"cannot write to the node cache {dst} as uid {os.getuid()}: {err.strerror}; "
            "make the folder writable by that uid on every node, or leave model.localCache.hostPath unset"
        ) from err
    progress = Progress(total, len(entries), say, clock)
    with _locked(dst, say):
        if is_complete(dst, entries):
            say(f"prewarm: {dst} already holds the checkpoint ({total / GIB:.2f} GiB, {len(entries)} files)")
            progress.add(total, copied=False)
            return progress
        free = shutil.disk_usage(dst).free
        say(f"prewarm: copying {total / GIB:.2f} GiB in {len(entries)} files from {src} to {dst}")
        for e in entries:
            target = dst / e.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_file() and target.stat().st_size == e.size:
                progress.add(e.size, copied=False)  # copied by an earlier, interrupted pod
            else:
                if e.size > free:
                    raise PrewarmError(f"{dst}: {free / GIB:.2f} GiB free, {e.path} needs {e.size / GIB:.2f} GiB")
                _copy_file(src / e.path, target, progress)
                free -= e.size
            progress.files_done += 1
        (dst / COMPLETE).write_text(_manifest_json(entries))
    progress.report()
    say(f"prewarm: done, {dst} is complete")
    return progress


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m dsv4.operator.prewarm SRC DST`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m dsv4.operator.prewarm SRC DST", file=sys.stderr)
        return 2

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        prewarm(Path(args[0]), Path(args[1]), say)
    except PrewarmError as err:
        print(f"prewarm: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
