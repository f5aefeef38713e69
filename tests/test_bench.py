"""The benchmark package: its registry agrees with `circuits bench --help`, and the library
stays free of it (only the CLI's `bench` command imports it, lazily)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import typing
from pathlib import Path

from typer.testing import CliRunner

import circuits
from circuits import cli

PACKAGE = Path(circuits.__file__).resolve().parent


def test_help_names_every_registered_benchmark():
    from circuits.bench import BENCHMARKS

    help_text = typing.get_type_hints(cli.bench, include_extras=True)["name"].__metadata__[0].help
    listed = re.fullmatch(r"Benchmark to run: (.*) \(every one but pythia and llc, side by side\)", help_text)
    assert listed, help_text
    assert re.split(r", (?:or )?|,? or ", listed.group(1)) == list(BENCHMARKS)
    from circuits.bench import NOT_IN_ALL

    assert NOT_IN_ALL == ("pythia", "llc")
    assert "Benchmark to run" in CliRunner().invoke(cli.app, ["bench", "--help"]).output


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_library_module_imports_the_benchmarks():
    library = [p for p in PACKAGE.rglob("*.py") if "bench" not in p.relative_to(PACKAGE).parts and p.name != "cli.py"]
    assert len(library) > 10
    offenders = [str(p.relative_to(PACKAGE)) for p in library
                 if any(n == "circuits.bench" or n.startswith("circuits.bench.") for n in _imports(p))]
    assert offenders == []


def test_the_cli_imports_the_benchmarks_only_when_asked():
    code = "import sys, circuits.cli; print(any(m.startswith('circuits.bench') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_scaling_child_is_a_module_function():
    from circuits.bench import scaling

    module, _, function = scaling.CHILD.partition(" import ")
    assert module == "from circuits.bench.scaling" and function.startswith("child_main;")
    assert callable(scaling.child_main)


def test_bench_formation_times_both_sweeps_on_the_same_steps(induction_run):
    from circuits.bench import run_benchmark

    result = run_benchmark("formation", run=str(induction_run), steps="450,1000", rounds=1)
    figures = result["figures"]
    assert result["model"]["steps"] == 2 and set(result["rounds"]) == {"A", "B"}
    ratio = figures["formation defaults / account off (CPU)"]
    assert ratio["goal"] == 1.3 and ratio["value"] > 0
