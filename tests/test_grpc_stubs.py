"""The client's gRPC modules: compiled from TorchServe's protos, which it ships and which
must still be those of the installed server (no server needed)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import grpc_tools
import tomllib
from google import rpc
from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from packaging.requirements import Requirement

from samclient import protos
from torchserve_protos import PROTO_FOLDER, PROTO_NAMES, jar_protos, torchserve_jar

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "samclient"
SHIPPED = CLIENT / PROTO_FOLDER.name


class RecordingChannel:
    """A stand-in for ``grpc.Channel`` that records the method paths a stub asks for."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def unary_unary(self, path: str, **_: object) -> None:
        self.paths.append(path)

    unary_stream = stream_unary = stream_stream = unary_unary


def compiled_from_jar(tmp_path: Path) -> list[descriptor_pb2.FileDescriptorProto]:
    """The installed jar's protos compiled by grpcio-tools, laid out as the client's and
    without the JSON field names, which Python's generated modules leave out."""
    folder = tmp_path / PROTO_FOLDER
    folder.mkdir(parents=True)
    for name, data in jar_protos().items():
        (folder / name).write_bytes(data)
    out = tmp_path / "descriptors.pb"
    arguments = [
        "protoc", f"-I{tmp_path}", f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
        f"-I{Path(next(iter(rpc.__path__))).parent.parent}", f"--descriptor_set_out={out}",
        *(str(PROTO_FOLDER / name) for name in PROTO_NAMES),
    ]  # fmt: skip
    assert protoc.main(arguments) == 0
    files = list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)
    messages = [message for file in files for message in file.message_type]
    while messages:
        message = messages.pop()
        for field in message.field:
            field.ClearField("json_name")
        messages += message.nested_type
    return files


def test_the_shipped_protos_are_the_installed_servers() -> None:
    assert {name: (SHIPPED / name).read_bytes() for name in PROTO_NAMES} == jar_protos()
    assert "Apache License" in (SHIPPED / "LICENSE").read_text()


def test_the_compiled_modules_describe_the_installed_servers_protos(tmp_path: Path) -> None:
    """What the client imports is what the jar's protos compile to: messages, services,
    and the method each stub calls."""
    compiled = compiled_from_jar(tmp_path)
    stubs = protos.load_stubs()
    imported = [
        descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        for module in (stubs.inference_pb2, stubs.management_pb2)
    ]
    assert compiled == imported

    expected = {
        f"/{file.package}.{service.name}/{method.name}"
        for file in compiled
        for service in file.service
        for method in service.method
    }
    channel = RecordingChannel()
    stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    stubs.management_pb2_grpc.ManagementAPIsServiceStub(channel)
    assert set(channel.paths) == expected


def test_the_stubs_offer_what_the_client_calls() -> None:
    stubs = protos.load_stubs()
    inference_grpc, management_grpc = stubs.inference_pb2_grpc, stubs.management_pb2_grpc
    assert Path(stubs.inference_pb2.__file__).parent == Path(protos.__file__).parent

    # Services and their methods (the servicer base class lists every rpc).
    for method in ("Predictions", "Ping", "StreamPredictions"):
        assert hasattr(inference_grpc.InferenceAPIsServiceServicer, method), method
    for method in (
        "RegisterModel",
        "ListModels",
        "DescribeModel",
        "ScaleWorker",
        "UnregisterModel",
        "SetDefault",
    ):
        assert hasattr(management_grpc.ManagementAPIsServiceServicer, method), method
    assert hasattr(inference_grpc, "InferenceAPIsServiceStub")
    assert hasattr(management_grpc, "ManagementAPIsServiceStub")

    # Messages and the fields the client relies on.
    request = stubs.inference_pb2.PredictionsRequest(
        model_name="sam", model_version="1.0", input={"body": b"{}"}
    )
    assert request.input["body"] == b"{}"
    assert stubs.inference_pb2.PredictionResponse(prediction=b"x").prediction == b"x"
    assert stubs.inference_pb2.TorchServeHealthResponse(health="ok").health == "ok"
    mgmt = stubs.management_pb2
    mgmt.RegisterModelRequest(url="sam.mar", model_name="sam", initial_workers=1, synchronous=True)
    mgmt.ListModelsRequest(limit=10, next_page_token=0)
    mgmt.DescribeModelRequest(model_name="sam", model_version="", customized=False)
    mgmt.ScaleWorkerRequest(model_name="sam", min_worker=1, max_worker=2, synchronous=True)
    mgmt.UnregisterModelRequest(model_name="sam", model_version="1.0")
    assert mgmt.ManagementResponse(msg="done").msg == "done"


def test_the_clients_requirements_are_its_compiled_modules_floors() -> None:
    """The client asks for the protobuf and grpcio its compiled modules check for at import,
    and is built by the grpcio-tools the project develops with."""
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())
    server = tomllib.loads((REPO / "pyproject.toml").read_text())
    requires = {r.name: r for r in map(Requirement, client["project"]["dependencies"])}
    stubs = protos.load_stubs()
    header = Path(stubs.inference_pb2.__file__).read_text()
    gencode = re.search(r"^# Protobuf Python Version: (\S+)$", header, re.MULTILINE).group(1)
    assert f">={gencode}" in str(requires["protobuf"].specifier).split(",")
    grpc_floor = stubs.inference_pb2_grpc.GRPC_GENERATED_VERSION
    assert f">={grpc_floor}" in str(requires["grpcio"].specifier).split(",")

    def tools(requirements: list[str]) -> str:
        return next(str(r) for r in map(Requirement, requirements) if r.name == "grpcio-tools")

    build = tools(client["build-system"]["requires"])
    assert build == tools(server["project"]["optional-dependencies"]["dev"])
    assert build == f"grpcio-tools=={grpc_floor}"


def test_the_jar_is_the_installed_ones() -> None:
    spec = importlib.util.find_spec("ts")
    assert spec is not None and spec.origin is not None
    jar = torchserve_jar()
    assert jar == Path(spec.origin).parent / "frontend" / "model-server.jar"
    assert jar.is_file()
