"""The committed generated code must be exactly what protoc makes of the .proto files."""

from __future__ import annotations

from pathlib import Path

from services.common.protogen import PROTO_ROOT, generate, proto_files


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert written, "no generated files"
    protos = proto_files()
    assert protos
    for proto in protos:
        stem = proto.stem
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            fresh = tmp_path / "radixserve" / "v1" / f"{stem}{suffix}"
            committed = PROTO_ROOT / "radixserve" / "v1" / f"{stem}{suffix}"
            assert committed.exists(), f"{committed} missing: run `make protos`"
            assert fresh.read_text() == committed.read_text(), (
                f"{committed.name} drifted from {proto.name}: run `make protos`"
            )


def test_every_message_field_is_commented() -> None:
    """The contract documents itself: every field has a comment above or beside it."""
    for proto in proto_files():
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_field = (
                stripped.endswith(";")
                and "=" in stripped
                and not stripped.startswith(("option", "syntax", "package", "//", "import"))
            )
            if not is_field:
                continue
            above = lines[i - 1].strip()
            commented = "//" in line or above.startswith("//")
            assert commented, f"{proto.name}:{i + 1} field without a comment: {stripped}"
