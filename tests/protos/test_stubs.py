"""The committed stubs must be exactly what grpc_tools generates from the committed .proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ["reward_pb2.py", "reward_pb2.pyi", "reward_pb2_grpc.py"]


def test_committed_stubs_match_the_proto(tmp_path):
    proto = Path("protos/reward/v1/reward.proto")
    (tmp_path / proto.parent).mkdir(parents=True)
    (tmp_path / proto).write_bytes((ROOT / proto).read_bytes())
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        ".",
        "--python_out=.",
        "--pyi_out=.",
        "--grpc_python_out=.",
        str(proto),
    ]
    subprocess.run(cmd, cwd=tmp_path, check=True)
    for name in STUBS:
        fresh = (tmp_path / proto.parent / name).read_text()
        committed = (ROOT / proto.parent / name).read_text()
        assert fresh == committed, f"{proto.parent / name} is stale: run `make protos` and commit the result"


def test_every_rpc_and_field_has_a_comment():
    lines = (ROOT / "protos/reward/v1/reward.proto").read_text().splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        is_field = s.endswith(";") and "=" in s and not s.startswith(("//", "syntax", "option"))
        if s.startswith("rpc ") or (is_field and not s.startswith("package")):
            assert lines[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {s}"
