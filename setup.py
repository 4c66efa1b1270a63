"""Package discovery for the `dsv4` distribution; everything else is in pyproject.toml.

The top-level package folders (README.md, "What each folder holds") install as `dsv4.<folder>`. Subpackages are
discovered here so that a new folder with an `__init__.py` is packaged without editing a list.
"""

from setuptools import find_packages, setup

FOLDERS = ("kernels", "model_runtime", "protocol", "services", "operator")

packages = []
for folder in FOLDERS:
    packages.append(f"dsv4.{folder}")
    packages.extend(f"dsv4.{folder}.{sub}" for sub in find_packages(folder))

setup(packages=packages)
