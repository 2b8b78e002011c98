"""Regenerates the Python gRPC stubs in pdjax/v1/ from protos/.

The stubs are committed so that installing pdjax needs no code generator;
tests/test_protos.py fails when they drift from the .proto sources. The
generator is pinned (grpcio-tools==1.84.0, see pyproject's test extra) so the
stubs work with grpcio >= 1.84 and protobuf >= 7.35.1.

  python tools/gen_protos.py            # rewrite pdjax/v1/
  python tools/gen_protos.py --out DIR  # write elsewhere (the sync test)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"


def generate(out: Path) -> list[Path]:
  from grpc_tools import protoc
  import grpc_tools
  protos = sorted(PROTO_ROOT.glob("pdjax/v1/*.proto"))
  include = Path(grpc_tools.__file__).parent / "_proto"
  out.mkdir(parents=True, exist_ok=True)
  args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
          f"--pyi_out={out}", f"--grpc_python_out={out}",
          *[str(p) for p in protos]]
  if protoc.main(args) != 0:
    raise SystemExit("protoc failed")
  pkg = out / "pdjax" / "v1"
  init = pkg / "__init__.py"
  init.write_text('"""Generated gRPC stubs (tools/gen_protos.py); do not '
                  'edit."""\n')
  return sorted(pkg.glob("*.py*"))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", type=Path, default=ROOT)
  args = ap.parse_args(argv)
  for f in generate(args.out):
    print(f.relative_to(args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
