"""Every Python block of the README runs as written, and CI runs the README's test command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _kill_publishers_in

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def test_readme_has_python_examples() -> None:
    assert len(PYTHON) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_readme_python_block_runs(index: int, runtime_dir: str) -> None:
    env = dict(os.environ, SAMSARA_MP_RUNTIME_DIR=runtime_dir, SAMSARA_MP_IDLE_TIMEOUT="1000")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", PYTHON[index]], env=env, cwd=ROOT,
            capture_output=True, text=True, timeout=120,
        )
    finally:
        _kill_publishers_in(runtime_dir)
    assert proc.returncode == 0, f"block {index} failed:\n{PYTHON[index]}\n{proc.stderr[-3000:]}"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    bash = [code.strip() for lang, code in BLOCKS if lang == "bash"]
    test_cmd = next(c for c in bash if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()
