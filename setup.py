"""Package discovery for the `dsv4` distribution; everything else is in pyproject.toml.

The fixed top-level folders (DESIGN.md §1) install as `dsv4.<folder>`. Subpackages are discovered here so that a
new folder with an `__init__.py` is packaged without editing a list.
"""

from setuptools import find_packages, setup

FOLDERS = ("model_runtime", "kernels", "services", "operator")

packages = []
for folder in FOLDERS:
    packages.append(f"dsv4.{folder}")
    packages.extend(f"dsv4.{folder}.{sub}" for sub in find_packages(folder))

setup(packages=packages)
