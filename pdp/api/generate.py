"""Regenerate the committed gRPC stubs from proto/ (``python -m pdp.api.generate``).

The virtual include path ``pdp/api=proto`` puts the stubs under our package, because
``abc``, the proto package's first word, is a standard-library module name.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "proto/abc/pdp/v1/pdp.proto"


def generate(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{include}",
        "-Ipdp/api=proto",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"pdp/api/{PROTO.removeprefix('proto/')}",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    generate(ROOT)
    sys.exit(0)
