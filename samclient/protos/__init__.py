"""TorchServe's gRPC API: its protos, and the Python modules compiled from them.

``inference.proto`` and ``management.proto`` are TorchServe's own, copied unchanged from
the ``proto/`` folder of its frontend jar (``ts/frontend/model-server.jar``) by
``scripts/torchserve_protos.py``; they are under the Apache License 2.0 (``LICENSE``
here). The client's build (``setup.py``) compiles them into ``inference_pb2.py``,
``inference_pb2_grpc.py``, ``management_pb2.py`` and ``management_pb2_grpc.py`` in this
package, so a client needs neither TorchServe nor grpcio-tools at run time. The tests
check that these protos are still the installed server's.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

MODULE_NAMES = ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc")


@dataclass(frozen=True)
class Stubs:
    """The four compiled modules: messages (``*_pb2``) and service stubs (``*_pb2_grpc``)."""

    inference_pb2: ModuleType
    inference_pb2_grpc: ModuleType
    management_pb2: ModuleType
    management_pb2_grpc: ModuleType


def load_stubs() -> Stubs:
    """Import the compiled modules; only gRPC clients pay for importing protobuf and grpc.

    Returns:
      The four modules.

    Raises:
      ImportError: the client was not built (run from a source tree without installing it).
    """
    try:
        modules = {name: importlib.import_module(f"{__name__}.{name}") for name in MODULE_NAMES}
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith(__name__):
            raise
        raise ImportError(
            f"{err.name} is missing: it is compiled when the client is installed "
            "(pip install ./samclient, or -e for a source tree)"
        ) from err
    return Stubs(**modules)
