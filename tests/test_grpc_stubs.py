"""Fast checks that gRPC stubs generate from the installed TorchServe jar (no server needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from samclient import protos

GENERATED = (
    "inference_pb2.py",
    "inference_pb2_grpc.py",
    "management_pb2.py",
    "management_pb2_grpc.py",
)


def _mtimes(directory: Path) -> dict[str, int]:
    return {name: (directory / name).stat().st_mtime_ns for name in GENERATED}


def test_generate_stubs_writes_importable_modules(tmp_path: Path) -> None:
    out = protos.generate_stubs(tmp_path)
    assert out == tmp_path
    for name in GENERATED:
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / protos.STAMP_NAME).is_file()

    stubs = protos.load_stubs(tmp_path)
    inference_grpc, management_grpc = stubs.inference_pb2_grpc, stubs.management_pb2_grpc
    assert Path(stubs.inference_pb2.__file__).parent == tmp_path.resolve()

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


def test_second_call_does_not_regenerate(tmp_path: Path) -> None:
    protos.generate_stubs(tmp_path)
    before = _mtimes(tmp_path)
    assert protos.stubs_are_current(tmp_path)
    protos.generate_stubs(tmp_path)
    assert _mtimes(tmp_path) == before


def test_changed_jar_or_missing_file_regenerates(tmp_path: Path) -> None:
    protos.generate_stubs(tmp_path)
    (tmp_path / "management_pb2_grpc.py").unlink()
    assert not protos.stubs_are_current(tmp_path)
    protos.generate_stubs(tmp_path)
    assert (tmp_path / "management_pb2_grpc.py").is_file()

    # A different jar: size/mtime no longer match the stamp and neither does the sha256.
    stamp_path = tmp_path / protos.STAMP_NAME
    stamp = json.loads(stamp_path.read_text())
    stamp.update(jar_size=stamp["jar_size"] + 1, jar_sha256="0" * 64)
    stamp_path.write_text(json.dumps(stamp))
    assert not protos.stubs_are_current(tmp_path)
    before = _mtimes(tmp_path)
    protos.generate_stubs(tmp_path)
    assert protos.stubs_are_current(tmp_path)
    assert _mtimes(tmp_path) != before


def test_jar_is_the_installed_one() -> None:
    spec = importlib.util.find_spec("ts")
    assert spec is not None and spec.origin is not None
    jar = protos.torchserve_jar()
    assert jar == Path(spec.origin).parent / "frontend" / "model-server.jar"
    assert jar.is_file()


def test_touched_jar_with_same_content_is_still_current(tmp_path: Path) -> None:
    protos.generate_stubs(tmp_path)
    stamp_path = tmp_path / protos.STAMP_NAME
    stamp = json.loads(stamp_path.read_text())
    stamp["jar_mtime_ns"] -= 1  # as if the jar had been touched: hash it, same sha256
    stamp_path.write_text(json.dumps(stamp))
    before = _mtimes(tmp_path)
    assert protos.stubs_are_current(tmp_path)
    assert json.loads(stamp_path.read_text())["jar_mtime_ns"] == stamp["jar_mtime_ns"] + 1
    assert _mtimes(tmp_path) == before
