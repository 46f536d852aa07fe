"""The environment is read in one place, `podsettle/settings.py`, through pydantic-settings: every
other module gets its configuration handed to it (the command line's too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podsettle.application import Settlements
from podsettle.cli import app

ROOT = Path(__file__).resolve().parents[2]
# Tests and benchmarks configure themselves (seeds, example counts) and run subprocesses.
OUTSIDE = {"tests", "bench", "build", "dist", ".venv", ".typecheck"}
ALLOWED = {
    Path("podsettle/settings.py"),
    # TLS trust store variables read for the own HTTP layer; the file is being removed.
    Path("adapters/http_transport.py"),
}
READERS = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def _sources() -> list[Path]:
    return sorted(
        path.relative_to(ROOT)
        for path in ROOT.rglob("*.py")
        if not OUTSIDE & set(path.relative_to(ROOT).parts[:-1])
    )


def environment_reads(source: str) -> list[str]:
    """Each `os.environ`, `os.getenv`... (however os is imported) and each click/typer `envvar=`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in READERS:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [f"line {node.lineno}: from os import {a.name}" for a in node.names if a.name in READERS]
        elif isinstance(node, ast.keyword) and node.arg in ("envvar", "auto_envvar_prefix"):
            found.append(f"line {node.lineno}: {node.arg}=")
    return found


def test_the_source_tree_is_found() -> None:
    sources = _sources()
    assert Path("podsettle/settings.py") in sources and Path("podsettle/cli/commands.py") in sources
    assert Path("domain/escrow_job.py") in sources and Path("adapters/runpod.py") in sources
    assert not [path for path in sources if path.parts[0] in ("tests", "bench")]


@pytest.mark.parametrize(
    ("source", "reads"),
    [
        ("import os\nx = os.environ['A']", 1),
        ("import os\nx = os.getenv('A')", 1),
        ("import os as o\nx = o.environ.get('A')", 1),
        ("from os import environ, getenv\n", 2),
        ("import typer\nx = typer.Option(envvar='A')", 1),
        ("import os\nx = os.getpid(); y = os.path.join('a', 'b')", 0),
    ],
)
def test_the_check_sees_each_way_of_reading_the_environment(source: str, reads: int) -> None:
    assert len(environment_reads(source)) == reads


def test_only_the_settings_module_reads_the_environment() -> None:
    readers = {}
    for path in _sources():
        reads = environment_reads((ROOT / path).read_text(encoding="utf-8"))
        if reads and path not in ALLOWED:
            readers[str(path)] = reads
    assert readers == {}


def test_the_command_line_takes_the_views_path_from_the_settings(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    Settlements(store).close()
    views = tmp_path / "elsewhere" / "views.db"
    views.parent.mkdir()
    env = {"PODSETTLE_STORE": store, "PODSETTLE_VIEWS": str(views), "PODSETTLE_LOG_LEVEL": "ERROR"}
    result = CliRunner().invoke(app, ["totals", "--json"], env=env)
    assert result.exit_code == 0, result.stderr
    assert views.exists() and not (tmp_path / "store.db.views").exists()


def test_a_bad_log_level_is_a_configuration_error_naming_the_variable() -> None:
    result = CliRunner().invoke(app, ["totals"], env={"PODSETTLE_LOG_LEVEL": "chatty"})
    assert result.exit_code == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith("podsettle: error: log_level (PODSETTLE_LOG_LEVEL)")
    )


def test_a_store_in_memory_keeps_its_views_in_memory_not_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The views of a store in memory go with its log: a file in the working directory would
    outlive that log, and the next store's views would not match it."""
    monkeypatch.chdir(tmp_path)
    env = {"PODSETTLE_STORE": "memory", "PODSETTLE_LOG_LEVEL": "ERROR"}
    for _ in range(2):  # a second store in memory finds no views of the first
        result = CliRunner().invoke(app, ["totals", "--json"], env=env)
        assert result.exit_code == 0, result.stderr
        assert '"jobs": 0' in result.stdout
    assert list(tmp_path.iterdir()) == []
