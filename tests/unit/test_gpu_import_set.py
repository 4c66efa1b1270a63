"""`bench/gpu.sh` on a bare GPU machine: only torch, triton, pytest, safetensors and tokenizers (and what they need) are
installed there, and dsv4 is not. Every test `gpu.sh` runs must collect with exactly that import set: a kernel or
model-runtime module that imports redis, fastapi or the services would fail on the device, as it once did.

The child process runs pytest's collection with a finder in front of every other that refuses any top-level module
outside the standard library and that set, and any dsv4 package the link farm of `gpu.sh` does not provide.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DEVICE_DISTRIBUTIONS = ("torch", "triton", "pytest", "safetensors", "tokenizers")
GPU_SH = ROOT / "bench" / "gpu.sh"

CHILD = r"""
import importlib.abc, json, sys
allowed, dsv4_allowed, args = json.loads(sys.argv[1]), set(json.loads(sys.argv[2])), json.loads(sys.argv[3])

class BareMachine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top == "dsv4":
            if name.count(".") >= 1 and name.split(".")[1] not in dsv4_allowed:
                raise ModuleNotFoundError(f"No module named {name!r} (not on the bare GPU machine)", name=name)
            return None
        if top in sys.stdlib_module_names or top in allowed or top.startswith("_"):
            return None
        raise ModuleNotFoundError(f"No module named {top!r} (not on the bare GPU machine)", name=top)

sys.meta_path.insert(0, BareMachine())
if args and args[0] == "--import-scripts":
    import importlib.util
    for i, path in enumerate(args[1:]):
        spec = importlib.util.spec_from_file_location(f"gpu_sh_script_{i}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    sys.exit(0)
import pytest
sys.exit(pytest.main(args))
"""


def _requirement_closure(roots: tuple[str, ...]) -> set[str]:
    """The distributions `roots` need, transitively (extras not included)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
    return seen


def _top_level_modules(distributions: set[str]) -> set[str]:
    mapping = metadata.packages_distributions()
    return {mod for mod, dists in mapping.items() if any(d.lower().replace("_", "-") in distributions for d in dists)}


def _gpu_sh_linked_packages() -> list[str]:
    """The dsv4 packages gpu.sh links into its PYTHONPATH (`for d in ...; do ln -sfn`)."""
    match = re.search(r"for d in ([\w ]+); do ln -sfn", GPU_SH.read_text())
    assert match, "bench/gpu.sh no longer builds its link farm the expected way"
    return match.group(1).split()


def _gpu_sh_scripts() -> list[str]:
    """Every bench/ script gpu.sh runs."""
    return sorted(set(re.findall(r"\b(bench/\w+\.py)", GPU_SH.read_text())))


def _gpu_sh_test_paths() -> list[str]:
    """Every tests/ path gpu.sh hands to pytest."""
    return sorted(set(re.findall(r"\b(tests/[\w/.]+)", GPU_SH.read_text())))


def test_the_tests_gpu_sh_runs_collect_with_only_the_device_packages(tmp_path: Path) -> None:
    allowed = _top_level_modules(_requirement_closure(DEVICE_DISTRIBUTIONS))
    # the repository's tests; numpy only because this machine has no GPU and runs Triton's interpreter, which needs it
    allowed |= {"tests", "numpy"}
    assert {"torch", "triton", "pytest", "safetensors", "tokenizers"} <= allowed
    assert not {"redis", "fastapi", "pydantic", "crc32c"} & allowed
    paths = [p for p in _gpu_sh_test_paths() if (ROOT / p).exists()]
    assert paths, "gpu.sh runs no tests"
    linked = _gpu_sh_linked_packages()
    args = ["--collect-only", "-q", "-c", "/dev/null", "--rootdir", str(ROOT), "--import-mode=importlib",
            "-p", "no:cacheprovider", *paths]  # fmt: skip
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(sorted(allowed)), json.dumps(linked), json.dumps(args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    collected = re.search(r"(\d+) tests? collected", done.stdout)
    assert collected and int(collected.group(1)) > 50, done.stdout[-2000:]


def test_the_benchmarks_gpu_sh_runs_import_with_only_the_device_packages() -> None:
    """The engine benchmark imports the engine: a module-level import of a serving library (or of crc32c, which
    the KV blob format needs) would fail on the device before printing a number."""
    allowed = _top_level_modules(_requirement_closure(DEVICE_DISTRIBUTIONS)) | {"numpy"}
    scripts = _gpu_sh_scripts()
    assert {"bench/kernels_gpu.py", "bench/engine_gpu.py"} <= set(scripts)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(sorted(allowed)), json.dumps(_gpu_sh_linked_packages()),
         json.dumps(["--import-scripts", *scripts])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
