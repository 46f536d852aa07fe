"""The package installs as `podsettle.*` only, and importing it stays light."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {
    "podsettle": "podsettle",
    "domain": "podsettle.domain",
    "adapters": "podsettle.adapters",
    "sandbox": "podsettle.sandbox",
    "projections": "podsettle.projections",
    "replay": "podsettle.replay",
}


def _modules() -> list[str]:
    names = []
    for folder, package in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__main__":  # runs the command line when imported
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join((package, *parts)))
    return names


def test_importing_podsettle_does_not_import_heavy_modules() -> None:
    code = (
        "import sys, podsettle, podsettle.domain, podsettle.adapters;"
        "heavy = [m for m in ('runpod', 'uvicorn', 'starlette', 'mcp', 'boto3') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == ""


@pytest.mark.slow
def test_a_non_editable_install_puts_only_podsettle_into_site_packages(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    wheel = next(wheels.glob("podsettle-*.whl"))
    # Install the wheel alone, then let the fresh environment see this one's dependencies (a plain
    # path, so the editable finder of the development install is not loaded).
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # `bin` holds the `podsettle` console script that --target installs beside the packages.
    top_level = sorted(
        p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and p.name != "bin"
    )
    assert top_level == ["podsettle"], top_level
    check = (
        "import importlib, podsettle, podsettle.domain, sys;"
        f"assert podsettle.__file__.startswith({str(site)!r}), podsettle.__file__;"
        f"[importlib.import_module(m) for m in {_modules()!r}];"
        "print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
