"""The client's one build step: compile the TorchServe protos it ships into gRPC modules.

The modules are made at build time, not kept in git, so they always come from the
``.proto`` files beside them, by the grpcio-tools that pyproject.toml's build
requirements pin; that version sets the floors of the protobuf and grpcio requirements.
Everything else about the distribution is declared in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = Path("samclient") / "protos"


def compile_protos(out: Path) -> None:
    """Write ``samclient/protos/*_pb2.py`` and ``*_pb2_grpc.py`` below ``out``.

    Arguments:
      out: the folder that holds the ``samclient`` package being built.
    """
    import grpc_tools
    from google import rpc
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    googleapis = Path(next(iter(rpc.__path__))).parent.parent  # google/rpc/status.proto
    sources = sorted(str(path.relative_to(ROOT)) for path in (ROOT / PROTOS).glob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    arguments = [
        "grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}", f"-I{googleapis}",
        f"--python_out={out}", f"--grpc_python_out={out}", *sources,
    ]  # fmt: skip
    if protoc.main(arguments) != 0:
        raise RuntimeError(f"protoc could not compile {sources}")


class BuildPyWithProtos(build_py):
    """``build_py`` that also compiles the protos: into the package itself for an editable
    install, which imports from the source tree, else into the build folder, after the
    sources were copied there (so modules left in a source tree never replace them)."""

    def run(self) -> None:
        super().run()
        compile_protos(ROOT if self.editable_mode else Path(self.build_lib))


setup(cmdclass={"build_py": BuildPyWithProtos})
