"""The committed gRPC stubs are what proto/opd/v1/teacher.proto generates today."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_current():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def test_check_fails_on_a_changed_proto(tmp_path, monkeypatch):
    """The staleness check can fail: a proto with one more field generates different stubs."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gen_proto

    proto = (ROOT / "proto" / "opd" / "v1" / "teacher.proto").read_text()
    changed = tmp_path / "proto"
    changed.mkdir()
    (changed / "teacher.proto").write_text(
        proto.replace("int64 forward_tokens = 2;", "int64 forward_tokens = 2;\n  int64 extra = 3;")
    )
    monkeypatch.setattr(gen_proto, "PROTO_DIR", changed)
    fresh = gen_proto.generate(tmp_path / "out")
    committed = ROOT / "client" / "opd_client" / "v1" / "teacher_pb2.py"
    assert (fresh / "teacher_pb2.py").read_bytes() != committed.read_bytes()
