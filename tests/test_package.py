"""The package's shape: the library knows nothing of Prefect; one installed import name."""

import subprocess
import sys
import tomllib
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
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {name.split(".")[0] for name in setuptools["packages"]} == {"tapeline"}
    assert set(setuptools["package-dir"]) == {"tapeline.flows", "tapeline.tasks"}
