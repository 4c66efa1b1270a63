"""A wheel built from the repository installs into a fresh venv, imports every dsv4.* module and has the script."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

IMPORT_ALL = """
import importlib, pkgutil, sys
import dsv4.kernels, dsv4.model_runtime, dsv4.protocol, dsv4.services, dsv4.operator
names = []
for pkg in (dsv4.kernels, dsv4.model_runtime, dsv4.protocol, dsv4.services, dsv4.operator):
    assert all(p.startswith(sys.prefix) for p in pkg.__path__), pkg.__path__
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
        names.append(info.name)
print(len(names))
"""


def _source_tree(dest: Path) -> Path:
    """The repository's files as git sees them (tracked, and new files not ignored), without build leftovers: a
    build in place reuses build/lib, which keeps modules deleted from the sources since."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    source = _source_tree(tmp_path_factory.mktemp("source"))
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out.glob("dsv4-*.whl")
    return path


def test_wheel_holds_only_the_dsv4_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"dsv4", next(t for t in tops if t.endswith(".dist-info"))}
    for folder in ("kernels", "model_runtime", "protocol", "services", "operator"):
        assert any(n.startswith(f"dsv4/{folder}/") for n in names), folder
    assert "dsv4/operator/__init__.py" not in names


def test_fresh_venv_imports_everything_and_has_the_script(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    done = subprocess.run(
        [py, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # Third-party dependencies come from this venv's site-packages (read-only, via a .pth file); dsv4 itself only
    # from the wheel, since a .pth-added folder's own .pth files (the editable hook) are not executed.
    fresh_site = Path(
        subprocess.check_output(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (fresh_site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run(
        [py, "-c", IMPORT_ALL], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 2
    done = subprocess.run(
        [env_dir / "bin" / "dsv4", "--help"], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "make-checkpoint" in done.stdout
