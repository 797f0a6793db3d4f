"""Every code block of the README is executed by a test.

- ``python`` blocks run as written, each as a script of its own.
- A block whose info string names a file (```python examples/pool/pool_example.py)
  is an excerpt of that example: its lines appear in the file, in order, and the
  example itself runs in the test named in ``EXAMPLE_TESTS``.
- ``bash`` blocks are the two quick-start commands: CI runs the test command
  verbatim (checked here), and the install-and-demo command runs verbatim in a
  fresh copy of the project, with a fresh venv.
- ``text`` blocks are diagrams; no other kind of block, and no block without a
  kind, is allowed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _kill_publishers_in

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```$", flags=re.S | re.M)
BLOCKS = [(info.split(), code) for info, code in FENCE.findall(README)]
PYTHON = [code for info, code in BLOCKS if info == ["python"]]
EXCERPTS = [(info[1], code) for info, code in BLOCKS if len(info) == 2]
BASH = [code.strip() for info, code in BLOCKS if info == ["bash"]]

# Each example the README quotes, and the test that runs it for real.
_FRAMEWORK_EXAMPLES = "test_the_framework_examples_serve_and_deliver"
EXAMPLE_TESTS = {
    "examples/gunicorn/gunicorn.conf.py": ("test_gunicorn.py", "test_the_example_config_serves_and_delivers"),
    "examples/uwsgi/uwsgi.ini": ("test_uwsgi.py", "test_the_example_ini_serves_and_delivers"),
    "examples/celery/tasks.py": ("test_celery.py", "test_the_celery_example_delivers_every_event"),
    "examples/pool/pool_example.py": ("test_pool.py", "test_the_pool_example_delivers_every_event"),
    "examples/django/mysite/settings.py": ("test_frameworks.py", _FRAMEWORK_EXAMPLES),
    "examples/flask/app.py": ("test_frameworks.py", _FRAMEWORK_EXAMPLES),
    "examples/fastapi/app.py": ("test_frameworks.py", _FRAMEWORK_EXAMPLES),
}


def test_every_block_has_a_kind_this_module_executes() -> None:
    fences = [line for line in README.splitlines() if line.startswith("```")]
    assert len(fences) == 2 * len(BLOCKS), "an unclosed or nested fence"
    kinds = {info[0] if info else "" for info, _ in BLOCKS}
    assert kinds <= {"python", "ini", "bash", "text"}, kinds
    for info, code in BLOCKS:
        assert info in (["python"], ["bash"], ["text"]) or len(info) == 2, f"unrunnable block: {info}\n{code}"
    assert len(PYTHON) >= 3 and len(EXCERPTS) >= 4 and len(BASH) == 2


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_readme_python_block_runs(index: int, runtime_dir: str, tmp_path: Path) -> None:
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(PYTHON[index])
    env = dict(os.environ, SAMSARA_MP_RUNTIME_DIR=runtime_dir, SAMSARA_MP_IDLE_TIMEOUT="1000")
    try:
        proc = subprocess.run(
            [sys.executable, str(script)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
    finally:
        _kill_publishers_in(runtime_dir)
    assert proc.returncode == 0, f"block {index} failed:\n{PYTHON[index]}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("path", sorted({path for path, _ in EXCERPTS}))
def test_readme_excerpts_are_the_tested_examples(path: str) -> None:
    lines = (ROOT / path).read_text().splitlines()
    for quoted_path, code in EXCERPTS:
        if quoted_path != path:
            continue
        at = 0
        for line in (ln for ln in code.splitlines() if ln.strip()):
            try:
                at = lines.index(line, at) + 1
            except ValueError:
                pytest.fail(f"README quotes a line that {path} does not have (in this order): {line!r}")
    test_file, test_name = EXAMPLE_TESTS[path]
    assert test_name in (ROOT / "tests" / test_file).read_text(), f"no test runs {path}"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_cmd = next(c for c in BASH if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_the_readme_install_and_demo_command_works_in_a_fresh_copy(tmp_path: Path) -> None:
    demo_cmd = next(c for c in BASH if "demo" in c)
    copy = tmp_path / "samsara_mp"
    shutil.copytree(
        ROOT, copy,
        ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__", ".*cache*"),
    )
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAMSARA_", "VIRTUAL_ENV", "PYTHON"))}
    env["SAMSARA_MP_RUNTIME_DIR"] = str(runtime)
    try:
        proc = subprocess.run(
            ["bash", "-c", demo_cmd], cwd=copy, env=env, capture_output=True, text=True, timeout=600,
        )
    finally:
        _kill_publishers_in(str(runtime))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout[proc.stdout.index("samsara-mp demo summary"):]
    assert re.search(r"delivered\s+100,000 \(publisher\), 100,000 \(ingestion server\)", summary), summary
    assert "verdict      OK" in summary, summary
