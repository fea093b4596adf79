"""Policy bundles: a directory of ``.rego`` files (+ ``data.json``), addressed by digest.

digest = sha256 of the canonical JSON ``{"files": {relpath: "sha256:<hex>"}}`` over every
``.rego`` and ``data.json`` file under the directory. Any added, removed, renamed or
edited policy file changes the digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdp.errors import ConfigError
from pdp.manifest.canonical import canonical_bytes, digest

__all__ = ["PolicyBundle", "load_bundle", "load_stored_bundle", "store_bundle"]


@dataclass(frozen=True)
class PolicyBundle:
    digest: str
    files: dict[str, bytes]  # relpath (POSIX) -> content

    def rego_modules(self) -> dict[str, str]:
        return {
            path: content.decode("utf-8")
            for path, content in sorted(self.files.items())
            if path.endswith(".rego")
        }


def _is_bundle_file(path: Path) -> bool:
    return path.suffix == ".rego" or path.name == "data.json"


def load_bundle(directory: Path) -> PolicyBundle:
    """Read a bundle directory and compute its digest; ``ConfigError`` if unusable.

    Symbolic links are refused: a bundle's content must be what its directory holds.
    """
    if not directory.is_dir():
        raise ConfigError(f"policy bundle {directory} is not a directory")
    files: dict[str, bytes] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            raise ConfigError(f"policy bundle {directory}: symbolic link {path} refused")
        if path.is_file() and _is_bundle_file(path):
            relpath = path.relative_to(directory).as_posix()
            content = path.read_bytes()
            try:
                content.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"policy bundle file {path} is not UTF-8") from exc
            files[relpath] = content
    if not any(path.endswith(".rego") for path in files):
        raise ConfigError(f"policy bundle {directory} holds no .rego file")
    index = {"files": {path: digest(content) for path, content in files.items()}}
    return PolicyBundle(digest=digest(canonical_bytes(index)), files=files)


def _store_path(root: Path, bundle_digest: str) -> Path:
    return root / bundle_digest.removeprefix("sha256:")


def store_bundle(bundle: PolicyBundle, root: Path) -> Path:
    """Keep a copy of ``bundle`` under ``root/<digest hex>/`` (content-addressed), once."""
    target = _store_path(root, bundle.digest)
    if target.exists():
        return target
    staging = root / f".{target.name}.tmp"
    for relpath, content in bundle.files.items():
        path = staging / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    staging.rename(target)
    return target


def load_stored_bundle(root: Path, bundle_digest: str) -> PolicyBundle:
    """The stored bundle for ``bundle_digest``; ``ConfigError`` if missing or not that bundle.

    The digest is recomputed: a bundle edited under its old digest is refused, never used.
    """
    path = _store_path(root, bundle_digest)
    if not path.is_dir():
        raise ConfigError(f"no stored policy bundle {bundle_digest} under {root}")
    bundle = load_bundle(path)
    if bundle.digest != bundle_digest:
        raise ConfigError(
            f"the bundle stored as {bundle_digest} now has digest {bundle.digest}: it was changed"
        )
    return bundle
