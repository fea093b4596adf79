"""`make test` installs (or names) every system tool the suite starts: scripts/system-tools.sh
covers each program a test runs that neither the venv nor the README's prerequisites give."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "system-tools.sh"
# make bench's own tools (perf): scripts/bench-tools.sh installs them.
BENCH_SCRIPT = ROOT / "scripts" / "bench-tools.sh"
VENV_BIN = Path(sys.executable).parent
# What the README's two commands themselves need: make, and bash for scripts/*.sh.
PREREQUISITES = {"make", "bash", "python3"}
_RUNNERS = {"run", "Popen", "check_output", "which", "create_subprocess_exec"}


def _programs_tests_run(bench: bool = False) -> dict[str, str]:
    """Program name -> a test file that runs it: first arguments of subprocess calls,
    shutil.which and tests/deploy's tool(), plus the commands of README shell blocks the
    tests execute (test_readme_calling runs them with bash). ``bench``: those of
    tests/bench alone (make bench), else the rest."""
    found: dict[str, str] = {}
    for path in (ROOT / "tests").rglob("*.py"):
        parts = path.relative_to(ROOT / "tests").parts
        if "image" in parts or ("bench" in parts) != bench:
            continue  # make image-test's own tools: scripts/image-tools.sh installs them
        runners = _RUNNERS | ({"tool"} if "deploy" in path.parts else set())
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if isinstance(first, ast.List) and first.elts:
                first = first.elts[0]
            elif name not in ("which", "tool", "create_subprocess_exec"):
                continue  # these runners take a list: server.run("stdio") is not one
            if (
                name in runners
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and re.fullmatch(r"[a-z][\w.-]*", first.value)
            ):
                found.setdefault(first.value, str(path.relative_to(ROOT)))
    if bench:
        return found
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", readme, re.S):
        if "curl " in block:
            found.setdefault("curl", "README.md (run by test_readme_calling)")
    return found


def _covered(script: Path = SCRIPT) -> set[str]:
    return set(re.findall(r"command -v ([\w.-]+)", script.read_text()))


def test_every_program_the_tests_run_is_installed_by_make_test() -> None:
    programs = _programs_tests_run()
    assert {"redis-server", "promtool", "prometheus", "node", "npm", "curl"} <= set(programs)
    missing = {
        name: where
        for name, where in programs.items()
        if name not in PREREQUISITES and not (VENV_BIN / name).exists() and name not in _covered()
    }
    assert not missing, f"not installed by scripts/system-tools.sh: {missing}"


def test_every_program_the_benchmarks_run_is_installed_by_make_bench() -> None:
    programs = _programs_tests_run(bench=True)
    assert "perf" in programs
    covered = _covered() | _covered(BENCH_SCRIPT)
    missing = {
        name: where
        for name, where in programs.items()
        if name not in PREREQUISITES and not (VENV_BIN / name).exists() and name not in covered
    }
    assert not missing, f"not installed by scripts/bench-tools.sh: {missing}"


def test_without_root_it_names_the_exact_apt_line(tmp_path: Path) -> None:
    # A PATH with none of the tools, no sudo, and an `id` that says "not root".
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("bash", "env"):
        (bin_dir / program).symlink_to(str(shutil.which(program)))
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "id").chmod(0o755)
    done = subprocess.run(
        [str(bin_dir / "bash"), str(SCRIPT)],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir)},
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert (
        "sudo apt-get update && sudo apt-get install -y --no-install-recommends"
        " redis-server prometheus nodejs npm curl"
    ) in done.stderr
