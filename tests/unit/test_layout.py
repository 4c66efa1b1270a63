"""Import hygiene: the fixed folders import as dsv4.*, and `operator/` never shadows the standard library."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("kernels", "model_runtime", "protocol", "services", "operator")
STDLIB_OPERATOR = "import operator, collections, dsv4.operator; assert hasattr(operator, 'itemgetter'); print('ok')"


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.parametrize("flags", [[], ["-S"]], ids=["site", "no-site"])
def test_stdlib_operator_wins_from_repo_root(flags: list[str]) -> None:
    # -S skips `site`, which would otherwise import the stdlib operator before the working directory is searched.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if flags:
        site_packages = next(p for p in sys.path if p.endswith("site-packages"))
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), site_packages])
    done = _run([sys.executable, *flags, "-c", STDLIB_OPERATOR.replace(", dsv4.operator", "")], ROOT, env)
    assert done.returncode == 0, done.stderr
    done = _run([sys.executable, "-c", STDLIB_OPERATOR], ROOT, env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_operator_folder_is_a_namespace_portion() -> None:
    # A regular package (with __init__.py) named `operator` on sys.path would beat the stdlib module.
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_pyproject_maps_every_fixed_folder() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    assert mapping == {f"dsv4.{folder}": folder for folder in FOLDERS}
    for folder in (*FOLDERS, "charts", "tests", "bench"):
        assert (ROOT / folder).is_dir(), folder


@pytest.mark.parametrize("folder", FOLDERS)
def test_packages_import_under_dsv4(folder: str) -> None:
    done = _run([sys.executable, "-c", f"import dsv4.{folder} as m; print(list(m.__path__)[0])"], Path("/"))
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == ROOT / folder
