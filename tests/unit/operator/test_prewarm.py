"""The weights pre-warm of `model.localCache`: copies every file, reports progress, resumes, marks the cache
complete, and fails with a message naming the path when it cannot write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dsv4.operator import prewarm

pytestmark = pytest.mark.unit


def _checkpoint(root: Path) -> Path:
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model-00001.safetensors").write_bytes(os.urandom(3 << 20))
    (src / "config.json").write_text('{"x": 1}')
    (src / "sub" / "tokenizer.json").write_text("{}")
    return src


class Clock:
    """A clock that advances one second per reading, so every chunk is a progress report."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_copies_reports_and_marks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prewarm, "CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(prewarm, "REPORT_EVERY_S", 2.0)
    src, dst = _checkpoint(tmp_path), tmp_path / "cache" / "pro-1"
    lines: list[str] = []
    progress = prewarm.prewarm(src, dst, lines.append, Clock())
    for e in prewarm.manifest(src):
        assert (dst / e.path).read_bytes() == (src / e.path).read_bytes()
    assert progress.done == progress.total == sum(e.size for e in prewarm.manifest(src))
    reports = [line for line in lines if "GiB/s" in line]
    assert len(reports) >= 2 and "3/3 files" in reports[-1] and "(100.0%)" in reports[-1]
    assert lines[-1].endswith("is complete")
    assert not list(dst.rglob("*" + prewarm.PARTIAL))
    # A second pod on the node finds it complete and copies nothing.
    lines.clear()
    again = prewarm.prewarm(src, dst, lines.append, Clock())
    assert again.copied == 0 and "already holds the checkpoint" in lines[0]


def test_resumes_after_an_interrupted_copy(tmp_path: Path) -> None:
    src, dst = _checkpoint(tmp_path), tmp_path / "cache"
    dst.mkdir()
    (dst / "config.json").write_text('{"x": 1}')  # copied before the pod died
    (dst / "model-00001.safetensors.partial").write_bytes(b"torn")
    progress = prewarm.prewarm(src, dst, lambda _: None)
    assert progress.copied == (3 << 20) + len("{}")  # the finished file is not copied again
    assert (dst / "model-00001.safetensors").stat().st_size == 3 << 20


def test_a_changed_checkpoint_is_copied_again(tmp_path: Path) -> None:
    src, dst = _checkpoint(tmp_path), tmp_path / "cache"
    prewarm.prewarm(src, dst, lambda _: None)
    (src / "config.json").write_text('{"x": 22}')
    progress = prewarm.prewarm(src, dst, lambda _: None)
    assert progress.copied == len('{"x": 22}') and (dst / "config.json").read_text() == '{"x": 22}'


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(prewarm.PrewarmError, match="is not a folder: is the model volume mounted"):
        prewarm.prewarm(tmp_path / "missing", tmp_path / "dst", lambda _: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(prewarm.PrewarmError, match="holds no files"):
        prewarm.prewarm(tmp_path / "empty", tmp_path / "dst", lambda _: None)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(prewarm.PrewarmError, match=r"cannot write to the node cache .* as uid"):
        prewarm.prewarm(_checkpoint(tmp_path), blocker / "dst", lambda _: None)
    assert prewarm.main(["only-one"]) == 2
    assert prewarm.main([str(tmp_path / "missing"), str(tmp_path / "d")]) == 1
