"""Loading a recipe of examples/ as a module, so that its test runs the recipe's own code."""

from __future__ import annotations

import importlib.util
import sys
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

EXAMPLES = Path(__file__).parents[2] / "examples"


def recipe(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def balances(ledger: dict[str, Any]) -> dict[str, Decimal]:
    """The accounts of `GET /sandbox/ledger`, as Decimals."""
    return {a["account"]: Decimal(a["balance"]) for a in ledger["accounts"]}
