"""Generates the Python modules for protos/radixserve/v1/*.proto.

The generated code is committed so installing needs no codegen; `python -m services.common.protogen`
regenerates it in place and tests/common/test_protos.py fails when it drifts from the .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((root / "radixserve" / "v1").glob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Runs protoc on every .proto under `root` into `out_dir`; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(root)) for p in proto_files(root)]
    args = [
        "protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")
    return sorted((out_dir / "radixserve" / "v1").glob("*_pb2*.py*"))


def main() -> None:
    written = generate(PROTO_ROOT)
    for path in written:
        print(path.relative_to(PROTO_ROOT.parent))
    sys.exit(0)


if __name__ == "__main__":
    main()
