"""The layers of DESIGN.md, enforced: every import of every module, including those inside
functions and under `if TYPE_CHECKING`, points down the table or stays in its own layer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Source folders and the package each installs as (pyproject.toml's package-dir).
FOLDERS = {
    "podsettle": "podsettle",
    "domain": "podsettle.domain",
    "adapters": "podsettle.adapters",
    "sandbox": "podsettle.sandbox",
    "projections": "podsettle.projections",
    "replay": "podsettle.replay",
}
# Layer of a module: the longest prefix listed here names it.
LAYER_OF = {
    "podsettle.support": "support",
    "podsettle.domain": "domain",
    "podsettle.adapters": "adapters",
    "podsettle.projections": "projections",
    "podsettle.replay": "replay",
    "podsettle.sandbox": "sandbox",
    "podsettle.application": "application",
    "podsettle.writer": "application",
    "podsettle.processor": "application",
    "podsettle.follower": "application",
    "podsettle.requests": "application",
    "podsettle.results": "application",
    "podsettle.engine": "application",
    "podsettle.settings": "application",
    "podsettle.limits": "application",
    "podsettle.bounties": "application",
    "podsettle.batches": "application",
    "podsettle.slots": "application",
    "podsettle.bootstrap": "bootstrap",
    # The front ends: the command line now; the MCP server and the dashboard when they land.
    "podsettle.cli": "frontend",
    "podsettle.mcp": "frontend",
    "podsettle.web": "frontend",
    "podsettle": "facade",  # the package's lazy names only
}
# What each layer may import besides itself.
MAY_IMPORT: dict[str, set[str]] = {
    "support": set(),
    "domain": set(),
    "adapters": {"domain", "support"},
    "projections": {"domain", "support"},
    "replay": {"domain", "support", "adapters", "projections"},
    "sandbox": {"domain", "support", "adapters"},
    "application": {"domain", "support", "adapters", "projections", "replay"},
    "bootstrap": {"application", "domain", "support", "adapters", "sandbox"},
    "frontend": {
        *("bootstrap", "application", "domain", "support"),
        *("adapters", "sandbox", "projections", "replay"),
    },
    "facade": {"bootstrap", "application", "domain"},
}


def layer_of(module: str) -> str | None:
    best = max((p for p in LAYER_OF if module == p or module.startswith(p + ".")), key=len, default=None)
    return LAYER_OF[best] if best else None


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """Every podsettle module this file imports, wherever the import stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from podsettle import x` may name a submodule: judge it as that module.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name == "podsettle" or name.startswith("podsettle.")]


def violations(root: Path) -> list[str]:
    known = modules(root)
    problems = []
    for module, path in known.items():
        here = layer_of(module)
        if here is None:
            problems.append(f"{path.relative_to(root)}: module {module} is in no layer")
            continue
        for line, name in imports_of(module, path):
            # `from podsettle.x import Name` names an attribute: judge the module that holds it.
            parts = name.split(".")
            prefixes = (".".join(parts[:n]) for n in range(len(parts), 1, -1))
            name = next((p for p in prefixes if p in known), name)
            there = layer_of(name)
            if there is None or there == here or there in MAY_IMPORT[here]:
                continue
            problems.append(f"{path.relative_to(root)}:{line}: {here} imports {name} ({there})")
    return problems


def test_every_import_points_down_the_layers() -> None:
    assert violations(ROOT) == []


def test_the_rule_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "domain" / "model.py").write_text("def f():\n    from podsettle.engine import EngineCore\n")
    (tmp_path / "adapters" / "client.py").write_text("from ..sandbox import app\n")
    (tmp_path / "podsettle" / "support").mkdir()
    (tmp_path / "podsettle" / "support" / "logs.py").write_text("import podsettle.domain.money\n")
    assert violations(tmp_path) == [
        "podsettle/support/logs.py:1: support imports podsettle.domain.money (domain)",
        "domain/model.py:2: domain imports podsettle.engine.EngineCore (application)",
        "adapters/client.py:1: adapters imports podsettle.sandbox.app (sandbox)",
    ]
