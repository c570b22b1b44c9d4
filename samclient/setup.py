"""The client's one build step: compile the TorchServe protos it ships into gRPC modules.

The modules are made at build time, not kept in git, so they always come from the
``.proto`` files beside them, by the grpcio-tools that pyproject.toml's build
requirements pin; that version sets the floors of the protobuf and grpcio requirements.
Everything else about the distribution is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent  # the samclient package itself
PROTOS = ROOT / "protos"


def compile_protos(destination: Path) -> None:
    """Write the modules of ``protos/*.proto`` (``*_pb2.py``, ``*_pb2_grpc.py``) into
    ``destination``, the ``samclient.protos`` package being built.

    The protos are compiled from a copy at ``samclient/protos/``: their path there is
    what the generated modules import each other by, whatever this folder is called.
    """
    import grpc_tools
    from google import rpc
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    googleapis = Path(next(iter(rpc.__path__))).parent.parent  # google/rpc/status.proto
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "in" / "samclient" / "protos"
        staged.mkdir(parents=True)
        sources = []
        for proto in sorted(PROTOS.glob("*.proto")):
            shutil.copy(proto, staged / proto.name)
            sources.append(f"samclient/protos/{proto.name}")
        out = Path(tmp) / "out"
        out.mkdir()
        arguments = [
            "grpc_tools.protoc", f"-I{Path(tmp) / 'in'}", f"-I{well_known}", f"-I{googleapis}",
            f"--python_out={out}", f"--grpc_python_out={out}", *sources,
        ]  # fmt: skip
        if protoc.main(arguments) != 0:
            raise RuntimeError(f"protoc could not compile {sources}")
        destination.mkdir(parents=True, exist_ok=True)
        for module in (out / "samclient" / "protos").glob("*.py"):
            shutil.copy(module, destination / module.name)


class BuildPyWithProtos(build_py):
    """``build_py`` that also compiles the protos: into the package itself for an editable
    install, which imports from the source tree, else into the build folder, after the
    sources were copied there (so modules left in a source tree never replace them)."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        """The package's modules, less this build script: it sits in the package's own
        folder (``package-dir``), and an isolated build does not always know its path."""
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if Path(m[2]).resolve() != Path(__file__).resolve()]

    def run(self) -> None:
        super().run()
        built = Path(self.build_lib) / "samclient" / "protos"
        compile_protos(PROTOS if self.editable_mode else built)


setup(cmdclass={"build_py": BuildPyWithProtos})
