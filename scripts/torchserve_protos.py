#!/usr/bin/env python
"""Copy the installed TorchServe's gRPC protos and license into the client.

    python scripts/torchserve_protos.py     # after an upgrade of torchserve

TorchServe keeps its ``.proto`` files inside ``ts/frontend/model-server.jar``, under
``proto/``. The client ships ``inference.proto`` and ``management.proto`` from there, with
TorchServe's license, in ``samclient/protos/``, and compiles them when it is
installed. This copies them again from the installed server and reinstalls the client
(editable) so that its compiled modules follow. tests/test_grpc_stubs.py fails while the
shipped protos differ from the installed server's.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

CLIENT_ROOT = Path(__file__).resolve().parent.parent / "samclient"
# Where the protos sit below a folder on the import path: the generated modules import
# each other by this path.
PROTO_FOLDER = Path("samclient") / "protos"
PROTO_NAMES = ("inference.proto", "management.proto")
JAR_PROTO_DIR = "proto"
LICENSE_NAME = "LICENSE"


def torchserve_jar() -> Path:
    """The frontend jar of the installed torchserve (``ts/frontend/model-server.jar``)."""
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torchserve is not installed: cannot find the 'ts' package")
    for location in spec.submodule_search_locations:
        jar = Path(location) / "frontend" / "model-server.jar"
        if jar.is_file():
            return jar
    raise RuntimeError(f"no frontend/model-server.jar in {list(spec.submodule_search_locations)}")


def jar_protos(jar: Path | None = None) -> dict[str, bytes]:
    """The client's protos as the installed TorchServe's jar holds them.

    Arguments:
      jar: the frontend jar; None: the installed torchserve's.

    Returns:
      Each proto's bytes by file name (``inference.proto``, ``management.proto``).
    """
    jar = jar or torchserve_jar()
    protos = {}
    with zipfile.ZipFile(jar) as archive:
        for name in PROTO_NAMES:
            member = f"{JAR_PROTO_DIR}/{name}"
            try:
                protos[name] = archive.read(member)
            except KeyError as err:
                raise RuntimeError(f"{member} not found in {jar}") from err
    return protos


def copy_protos(root: Path = CLIENT_ROOT) -> Path:
    """Write the installed TorchServe's protos and its license where the client keeps them.

    Arguments:
      root: the client's project folder, the ``samclient`` package itself.

    Returns:
      The folder written to, ``root/protos``.
    """
    folder = root / PROTO_FOLDER.name
    for name, data in jar_protos().items():
        (folder / name).write_bytes(data)
    torchserve_license = metadata.distribution("torchserve").read_text(LICENSE_NAME)
    if torchserve_license is None:
        raise RuntimeError("the installed torchserve carries no LICENSE file")
    (folder / LICENSE_NAME).write_text(torchserve_license)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    folder = copy_protos()
    print(f"protos and license copied to {folder}; compiling them by reinstalling the client")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(CLIENT_ROOT)]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
