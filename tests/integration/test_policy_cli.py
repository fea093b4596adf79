"""`abcctl policy test`: passes on our bundle, fails on a broken one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.harness import BIN, POLICIES


def policy_test(policies: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "abcctl"), "policy", "test", str(policies)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_shipped_policy_passes() -> None:
    done = policy_test(POLICIES)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = int(done.stdout.strip().splitlines()[-1].split()[0])
    assert passed >= 20


def test_a_weakened_policy_fails_its_tests(tmp_path: Path) -> None:
    copy = tmp_path / "policies"
    shutil.copytree(POLICIES, copy)
    rego = copy / "abc" / "authz.rego"
    # Loosen maxLength by a thousand characters: the Rego tests must notice.
    source = rego.read_text()
    assert "count(value) > c.maxLength" in source
    rego.write_text(
        source.replace("count(value) > c.maxLength", "count(value) > c.maxLength + 1000")
    )
    done = policy_test(copy)
    assert done.returncode == 1
    assert "FAIL abc.authz_test.test_length_bounds" in done.stdout


def test_a_policy_that_does_not_compile_fails(tmp_path: Path) -> None:
    copy = tmp_path / "policies"
    shutil.copytree(POLICIES, copy)
    rego = copy / "abc" / "authz.rego"
    rego.write_text(rego.read_text() + "\nbroken := {\n")
    done = policy_test(copy)
    assert done.returncode == 1
    assert "abc/authz.rego" in done.stdout


def test_a_bundle_without_tests_fails(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text("package p\n")
    done = policy_test(tmp_path)
    assert done.returncode == 1
    assert "no test_ rules" in done.stderr
