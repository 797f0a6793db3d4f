"""CI runs the linters: ruff on every Python file we ship or test, mypy --strict on the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=240
    )


def test_ruff_is_clean() -> None:
    proc = _run("ruff", "check", "--no-cache", "samsara_mp", "tests", "benchmarks", "examples")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_is_clean() -> None:
    # strict = true comes from pyproject.toml; the package ships py.typed.
    assert (ROOT / "samsara_mp" / "py.typed").exists()
    proc = _run("mypy", "--strict", "samsara_mp")
    assert proc.returncode == 0, proc.stdout + proc.stderr
