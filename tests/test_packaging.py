"""The wheel works outside the checkout: it ships the library, the app (``circuits_app``) and
the built-in manifests (``circuits_manifests``), and the installed copy finds them.

The wheel is built from a copy of the sources (so that the checkout gets no ``build/`` or
``*.egg-info``), without build isolation (offline: the environment's setuptools), installed
with ``pip install --target SITE`` and run from a temporary folder with ``PYTHONPATH=SITE``;
the dependencies come from the test's own environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "circuits", "app", "checkpoints_manifest")


def test_every_package_of_the_library_is_listed_for_the_wheel():
    """pyproject lists its packages (setuptools cannot rename a found folder, so no `find`):
    a new package under circuits/ must be listed too, or the wheel lacks it."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "circuits").rglob("__init__.py")
               if "__pycache__" not in p.parts}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


INSTALLED_CHECK = """
import sys
from pathlib import Path
site = Path(sys.argv[1]).resolve()
import circuits
from circuits.app_launcher import APP_MAIN
from circuits.manifest import MANIFEST_DIR, builtin_manifests, load_manifest
assert Path(circuits.__file__).resolve().is_relative_to(site), circuits.__file__
assert MANIFEST_DIR.resolve().is_relative_to(site), MANIFEST_DIR
manifest = load_manifest("pythia-70m")
assert len(manifest.steps) == 154, manifest.steps
assert {"pythia-70m", "induction-2l", "modadd-p113"} <= set(builtin_manifests())
assert APP_MAIN.resolve() == site / "circuits_app" / "main.py", APP_MAIN
for page in ("overview", "circuit", "heads", "compare"):
    assert (APP_MAIN.parent / "views" / f"{page}.py").is_file(), page
assert (APP_MAIN.parent / "components" / "circuit_graph.py").is_file()
assert (APP_MAIN.parent / "favicon.svg").is_file()  # shipped, not fetched from a font host
from circuits.bench import BENCHMARKS
assert "app" in BENCHMARKS
from streamlit.testing.v1 import AppTest  # the installed app runs (no study: it says so)
at = AppTest.from_file(str(APP_MAIN), default_timeout=120).run()
assert not at.exception, [e.value for e in at.exception]
import app  # bound by main.py to the installed circuits_app folder
assert Path(app.__file__).resolve().parent == APP_MAIN.parent, app.__file__
print("installed ok")
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources and installed into a folder of its own."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (REPO / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(base / "dist")],
                   check=True, capture_output=True, text=True)
    (wheel,) = (base / "dist").glob("circuits-*.whl")
    site = base / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, text=True)
    return site


def _installed(site: Path, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_the_installed_wheel_finds_its_manifests_and_app(site, tmp_path):
    done = _installed(site, tmp_path, "-c", INSTALLED_CHECK, str(site))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "installed ok"


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo(site, tmp_path, induction_run):
    """`circuits demo --no-app --steps first:3` from the installed wheel. The session's induction
    run is copied where the demo trains it, so that training resumes with nothing to do: what
    is tested is the installed demo, not the training time (``.ci/run`` trains it in full)."""
    shutil.copytree(induction_run, tmp_path / "demo" / "induction-2l")
    done = _installed(site, tmp_path, "-m", "circuits", "demo", "--no-app", "--steps", "first:3",
                      "--out", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[4/4] skipped the app" in done.stdout
    assert (tmp_path / "demo" / "induction-study" / "study.json").is_file()
