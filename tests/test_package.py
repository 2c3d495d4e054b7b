"""The package's shape: the library knows nothing of Prefect; one installed import name."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

IMPORT_THE_LIBRARY = """
import importlib, pkgutil, sys
import tapeline
names = [m.name for m in pkgutil.walk_packages(tapeline.__path__, "tapeline.")]
library = [n for n in names if n != "tapeline.cli" and not n.startswith(("tapeline.flows", "tapeline.tasks"))]
for name in library:
    importlib.import_module(name)
leaked = sorted(n for n in sys.modules if n.split(".")[0] == "prefect" or n.startswith(("tapeline.flows", "tapeline.tasks")))
print(len(library), leaked)
"""


def test_the_library_imports_neither_prefect_nor_its_prefect_layer():
    result = subprocess.run([sys.executable, "-c", IMPORT_THE_LIBRARY], capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    count, leaked = result.stdout.strip().split(" ", 1)
    assert int(count) >= 30 and leaked == "[]", result.stdout


def test_tapeline_is_the_only_installed_import_name():
    """What the installed distribution puts on sys.path: its top-level.txt-like view, from the build's own listing."""
    listing = subprocess.run(
        [sys.executable, "-c", "import setuptools.config.pyprojecttoml as t; c = t.read_configuration('pyproject.toml');"
         "print(sorted({p.split('.')[0] for p in c['tool']['setuptools']['packages']}), sorted(c['tool']['setuptools']['package-dir']))"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert listing.stdout.split("\n")[0] == "['tapeline'] ['tapeline.flows', 'tapeline.tasks']", listing.stderr


def test_every_package_of_the_source_tree_is_installed():
    """A subpackage missing from pyproject's list imports from a checkout and fails in an installed copy."""
    listing = subprocess.run(
        [sys.executable, "-c", "import setuptools.config.pyprojecttoml as t; print(*t.read_configuration('pyproject.toml')['tool']['setuptools']['packages'])"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=True,
    )  # fmt: skip
    found = {".".join(("tapeline", *init.parent.relative_to(ROOT / "tapeline").parts)).rstrip(".") for init in (ROOT / "tapeline").rglob("__init__.py")}
    found |= {f"tapeline.{layer}" for layer in ("flows", "tasks")}
    assert set(listing.stdout.split()) == found
