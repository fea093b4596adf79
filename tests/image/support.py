"""Build deploy/Dockerfile for real with podman and run the images' filesystems in a chroot.

No image registry can be reached here and no container can be started by a runtime, so:

- The base image is stood in for by a Debian bookworm root made with ``mmdebstrap`` and
  tagged with the Dockerfile's base name. What differs from the official
  ``python:3.11.13-slim-bookworm``: Python is Debian's 3.11.2 (``/usr/bin/python3.11``, with
  ``python3.11-venv`` for ``python -m venv``; the official one is 3.11.13 built into
  ``/usr/local``), reached through ``/usr/local/bin/python`` symlinks so that the venvs point
  where they would on the official image; the root is Debian's ``minbase`` with /usr merged
  by symlinks and the documentation dropped as in ``debian:bookworm-slim`` (so no ``usrmerge``
  and no full ``perl``), plus ``ca-certificates`` as the official image has. No library the
  official image lacks (``libatomic1`` was one) is added.
- The Python packages come from the locks' own hashes: the host downloads them with pip and
  serves them on loopback as the build's ``PIP_INDEX_URL``.
- ``podman build --isolation=chroot --pull=never`` into a podman store of its own (removed
  afterwards), then each image's filesystem is mounted and run with ``chroot`` as the image's
  ``USER``, with the image's ``ENV`` and ``WORKDIR``, /proc and /dev mounted, and volumes as
  bind mounts, inside a private mount namespace that vanishes with the process.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.deploy.support import DEPLOY, dockerfile_stages
from tests.harness import ROOT, free_port

DOCKERFILE = DEPLOY / "Dockerfile"
LOCKS = tuple(sorted((DEPLOY / "image").glob("*.lock")))
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# What the official image has beyond Debian's minbase: its Python, and CA certificates.
BASE_PACKAGES = ("python3.11", "python3.11-venv", "ca-certificates")
# debian:bookworm-slim keeps no documentation, manual pages or translations.
SLIM_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
# The official image's configuration that a build or a run relies on (`podman import` has none).
BASE_CONFIG = (
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
SLOW = 900  # seconds for a download, a root or a build on a loaded two-core machine


class ImageTestError(RuntimeError):
    """A step of building or running the image failed; the message carries its output."""


def missing_tools() -> list[str]:
    """Tools the image test needs and cannot find (scripts/image-tools.sh installs them)."""
    needed = ("podman", "mmdebstrap", "unshare", "mount", "chroot")
    return [name for name in needed if shutil.which(name) is None]


def base_name() -> str:
    """The one external base every stage of the Dockerfile starts from."""
    stage_names = {stage.name for stage in dockerfile_stages(DOCKERFILE)}
    bases = {s.base for s in dockerfile_stages(DOCKERFILE) if s.base not in stage_names}
    assert len(bases) == 1, f"expected one external base image, found {sorted(bases)}"
    return bases.pop()


def qualified(name: str) -> str:
    """How podman names a Docker Hub short name, so that FROM finds the stand-in locally."""
    return name if "/" in name else f"docker.io/library/{name}"


def check(argv: Sequence[object], timeout: float = SLOW) -> str:
    """Run a host command; its stdout, or ImageTestError with the last of its output."""
    args = [str(a) for a in argv]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageTestError(f"{shlex.join(args)}: no result after {timeout:.0f} s") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        raise ImageTestError(f"{shlex.join(args)} exited {done.returncode}:\n{tail}")
    return done.stdout


def make_base_tarball(out: Path) -> None:
    """The stand-in for the official base image, as a root filesystem tarball."""
    # Slim as debian:bookworm-slim is made: dpkg told to skip the paths, and what the first
    # unpacking put there removed. (mmdebstrap's --dpkgopt=path-exclude would do the same but
    # pipes every package through its tar filter, 20 s more on two cores.)
    excludes = shlex.quote("".join(f"path-exclude={pattern}\n" for pattern in SLIM_EXCLUDES))
    config = '"$1/etc/dpkg/dpkg.cfg.d"'
    slim_config = f"mkdir -p {config} && printf {excludes} > {config}/docker"
    slim_clean = " ".join(f'"$1"{pattern}' for pattern in SLIM_EXCLUDES)
    links = 'cd "$1/usr/local/bin" && ln -s /usr/bin/python3.11 python && ln -s python python3'
    check(
        [
            "mmdebstrap",
            "--variant=minbase",
            # /usr merged by symlinks as debootstrap (and so the official image) does; without
            # it apt merges with the usrmerge package, which brings the whole of perl.
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            f"--include={','.join(BASE_PACKAGES)}",
            f"--setup-hook={slim_config}",
            f"--essential-hook=rm -rf {slim_clean}",
            f"--customize-hook={links}",
            SUITE,
            out,
            *MIRRORS,
        ]
    )


def wheel_index(directory: Path) -> Path:
    """Every wheel the locks pin, hash-checked by pip, laid out as a PEP 503 simple index."""
    wheels = directory / "wheels"
    # One pip for all the locks: a wheel two locks share is fetched and checked once.
    check(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--require-hashes",
            "--only-binary=:all:",
            "--ignore-requires-python",
            "--no-deps",
            "--dest",
            wheels,
            *(f"--requirement={lock}" for lock in LOCKS),
        ]
    )
    simple = directory / "index" / "simple"
    for wheel in wheels.glob("*.whl"):
        project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        (simple / project).mkdir(parents=True, exist_ok=True)
        wheel.rename(simple / project / wheel.name)
    return simple.parent


def serve_directory(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A static HTTP server on loopback; its directory listings are the index's pages."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, server, timeout=30)
    return server, port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ImageTestError(f"process {process.args!r} exited {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise ImageTestError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass(frozen=True)
class Podman:
    """podman with a store of its own, so the test neither sees nor leaves other images."""

    store: Path

    def __call__(self, *args: object, timeout: float = SLOW) -> str:
        return check(
            ["podman", "--root", self.store / "root", "--runroot", self.store / "run", *args],
            timeout=timeout,
        )

    def build(self, target: str, tag: str, index_url: str) -> None:
        self(
            "build",
            "--isolation=chroot",
            "--pull=never",
            f"--build-arg=PIP_INDEX_URL={index_url}",
            "--file",
            DOCKERFILE,
            # Docker reads Dockerfile.dockerignore by itself; podman 4.3 only when told.
            f"--ignorefile={DOCKERFILE}.dockerignore",
            "--target",
            target,
            "--tag",
            tag,
            ROOT,
        )

    def size(self, image: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", image).strip())

    def mount(self, image: str, name: str) -> Rootfs:
        """A container of the image (not started), its filesystem mounted read-write."""
        config = json.loads(self("image", "inspect", image))[0]["Config"]
        self("create", "--name", name, image)
        path = Path(self("mount", name).strip())
        return Rootfs(
            path=path,
            env=tuple(config.get("Env") or ()),
            user=config.get("User") or "0:0",
            workdir=config.get("WorkingDir") or "/",
        )

    def remove_everything(self) -> None:
        """Containers, mounts and images of this store, then the store itself."""
        try:
            self("system", "reset", "--force", timeout=300)
        finally:
            shutil.rmtree(self.store, ignore_errors=True)


@dataclass(frozen=True)
class Volume:
    """A bind mount into the root: a compose volume or bind."""

    source: Path
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class Rootfs:
    """An image's filesystem and the configuration a runtime would start it with."""

    path: Path
    env: tuple[str, ...]
    user: str
    workdir: str

    def uid(self) -> int:
        return int(self.user.split(":")[0])

    def argv(self, command: Sequence[str], volumes: Sequence[Volume] = ()) -> list[str]:
        """Run ``command`` as the image's user in a private mount namespace, chrooted.

        Every step execs the next, so the returned argv's process is the command's process
        itself: a signal sent to it reaches abc-pdp or abc-pep as `docker stop` would.
        """
        root = shlex.quote(str(self.path))
        steps = [
            "set -eu",
            f"mount -t proc proc {root}/proc",
            f"mount --rbind /dev {root}/dev",
        ]
        for volume in volumes:
            target = shlex.quote(f"{self.path}{volume.target}")
            if volume.source.is_dir():
                steps.append(f"mkdir -p {target}")
            else:
                steps.append(f"mkdir -p $(dirname {target}) && touch {target}")
            steps.append(f"mount --bind {shlex.quote(str(volume.source))} {target}")
            if volume.read_only:
                steps.append(f"mount -o remount,bind,ro {target}")
        run = ["chroot", f"--userspec={self.user}", str(self.path)]
        run += ["/usr/bin/env", "-i", "-C", self.workdir, f"HOME={self.home()}", *self.env]
        steps.append(f'exec {shlex.join(run)} "$@"')
        namespace = ["unshare", "--mount", "--propagation", "private"]
        return [*namespace, "sh", "-c", "\n".join(steps), "sh", *command]

    def home(self) -> str:
        """HOME as a container runtime sets it: the user's entry in the image's /etc/passwd."""
        for line in (self.path / "etc" / "passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[2] == str(self.uid()):
                return fields[5]
        return "/"

    def run(
        self, command: Sequence[str], volumes: Sequence[Volume] = (), timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command, volumes),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(
        self, command: Sequence[str], volumes: Sequence[Volume], log: Path
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as handle:
            return subprocess.Popen(
                self.argv(command, volumes),
                stdout=handle,
                stderr=subprocess.STDOUT,
            )


def owned_directory(path: Path, uid: int, mode: int = 0o750) -> Path:
    """An empty volume as compose makes one from the image's directory (abc's, 0750)."""
    path.mkdir(parents=True)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path
