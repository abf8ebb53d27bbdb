"""Regenerate the gRPC/protobuf stubs in client/opd_client/v1 from proto/opd/v1/teacher.proto.

protoc's `-I virtual=disk` mapping makes the generated imports read `from opd_client.v1 import ...`,
so the stubs live inside the client package with no sys.path tricks.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto" / "opd" / "v1"
STUB_DIR = ROOT / "client" / "opd_client" / "v1"
GENERATED = ("teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py")


def generate(out_root: Path) -> Path:
    """Write the stubs under out_root/opd_client/v1 and return that directory."""
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-Iopd_client/v1={PROTO_DIR}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        "opd_client/v1/teacher.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return out_root / "opd_client" / "v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed stubs are stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [n for n in GENERATED if (fresh / n).read_bytes() != _read(STUB_DIR / n)]
        if check:
            if stale:
                print(f"stale stubs: {stale}; run python scripts/gen_proto.py", file=sys.stderr)
                raise SystemExit(1)
            return
        for name in GENERATED:
            shutil.copyfile(fresh / name, STUB_DIR / name)
        print(f"wrote {', '.join(GENERATED)} to {STUB_DIR}")


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


if __name__ == "__main__":
    main()
