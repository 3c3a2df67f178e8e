"""The README's commands: the ones CI runs are the ones a user copies, and they work as written."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_code_lines() -> list[str]:
    lines, code = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            code = not code
        elif code:
            lines.append(re.sub(r"\s+#.*$", "", line))
    return lines


def test_ci_runs_the_readme_install_and_test_commands_exactly_as_written():
    printed = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    code = _readme_code_lines()
    install = next(line for line in code if line.startswith("pip install"))
    tests = next(line for line in code if line.startswith("pytest"))
    assert printed == [install, tests]
    assert tests == "pytest"  # the whole suite, as a user types it: not `python -m pytest`, no subset


@pytest.mark.slow
def test_the_readme_test_command_collects_every_test_file():
    # `pytest` (unlike `python -m pytest`) does not put the checkout on sys.path: a test file that imports
    # `tests.<module>` stops collection there
    pytest_exe = shutil.which("pytest")
    assert pytest_exe is not None, "pytest is not on PATH: the README's test command cannot run"
    result = subprocess.run(
        [pytest_exe, "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    assert {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")} <= collected
