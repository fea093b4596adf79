"""Policy bundle digests: any change to a policy file changes the digest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pdp.bundle import load_bundle
from pdp.errors import ConfigError
from pdp.manifest.canonical import canonical_bytes, digest


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    (tmp_path / "abc").mkdir()
    (tmp_path / "abc" / "authz.rego").write_text("package abc.authz\n")
    (tmp_path / "data.json").write_text("{}")
    (tmp_path / "README.md").write_text("not part of the bundle")
    return tmp_path


def test_digest_is_over_the_file_index(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    index = {
        "files": {
            "abc/authz.rego": digest(b"package abc.authz\n"),
            "data.json": digest(b"{}"),
        }
    }
    assert bundle.digest == digest(canonical_bytes(index))
    assert set(bundle.files) == {"abc/authz.rego", "data.json"}


@pytest.mark.parametrize(
    "change",
    [
        lambda d: (d / "abc" / "authz.rego").write_text("package abc.authz\n# edited\n"),
        lambda d: (d / "abc" / "authz.rego").rename(d / "abc" / "other.rego"),
        lambda d: (d / "extra.rego").write_text("package x\n"),
        lambda d: (d / "data.json").unlink(),
    ],
    ids=["edit", "rename", "add", "remove"],
)
def test_any_change_changes_the_digest(bundle_dir: Path, change: object) -> None:
    before = load_bundle(bundle_dir).digest
    change(bundle_dir)  # type: ignore[operator]
    assert load_bundle(bundle_dir).digest != before


def test_non_policy_files_do_not_count(bundle_dir: Path) -> None:
    before = load_bundle(bundle_dir).digest
    (bundle_dir / "README.md").write_text("changed")
    assert load_bundle(bundle_dir).digest == before


def test_symlink_refused(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside") / "evil.rego"
    outside.write_text("package evil\n")
    os.symlink(outside, bundle_dir / "evil.rego")
    with pytest.raises(ConfigError, match="symbolic link"):
        load_bundle(bundle_dir)


def test_no_rego_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no \.rego"):
        load_bundle(tmp_path)
