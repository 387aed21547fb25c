"""Generates the Python stubs for proto/tandem/v1 into <out>/tandem/v1.

Run from anywhere: `python proto/generate.py [OUT]` (OUT defaults to the repo root,
where the checked-in stubs live). A test regenerates into a temp dir and diffs.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent


def generate(out: Path) -> list[Path]:
    sources = sorted(PROTO_ROOT.glob("tandem/v1/*.proto"))
    (out / "tandem" / "v1").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(s) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "tandem" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent
    for path in generate(out):
        print(path)
