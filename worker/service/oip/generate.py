"""Regenerate ``inference_pb2.py`` and ``inference_pb2_grpc.py`` from
``inference.proto`` (needs ``grpcio-tools``, a test dependency)::

    python -m worker.service.oip.generate            # rewrites the modules here
    python -m worker.service.oip.generate OUTDIR     # writes them to OUTDIR

Two edits to protoc's output, both mechanical: the messages are built in a
private descriptor pool (``tritonclient.grpc`` and ``kserve`` register the
same ``inference.*`` names in the default pool, and a process that imports
two of them fails with "duplicate symbol"), and the gRPC module imports its
messages relatively. tests/unit/worker/test_oip_proto.py checks the committed
modules are exactly what this writes.
"""

from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = "inference.proto"


def generate(out_dir: str) -> list[str]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{HERE}", f"--python_out={tmp}",
                          f"--grpc_python_out={tmp}", os.path.join(HERE, PROTO)])  # fmt: skip
        if rc != 0:
            raise SystemExit(f"protoc failed ({rc})")
        with open(os.path.join(tmp, "inference_pb2.py")) as fh:
            pb2 = fh.read()
        with open(os.path.join(tmp, "inference_pb2_grpc.py")) as fh:
            grpc_mod = fh.read()
    default = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
    assert default in pb2, "protoc's output changed shape: update generate.py"
    pb2 = pb2.replace(
        default,
        "POOL = _descriptor_pool.DescriptorPool()  # private: see generate.py\n"
        "DESCRIPTOR = POOL.AddSerializedFile(",
    )
    relative = "import inference_pb2 as inference__pb2"
    assert relative in grpc_mod, "protoc's output changed shape: update generate.py"
    grpc_mod = grpc_mod.replace(relative, "from . import inference_pb2 as inference__pb2")
    written = []
    for name, text in (("inference_pb2.py", pb2), ("inference_pb2_grpc.py", grpc_mod)):
        path = os.path.join(out_dir, name)
        with open(path, "w") as fh:
            fh.write(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in generate(sys.argv[1] if len(sys.argv) > 1 else HERE):
        print(p)
