"""Python gRPC stubs generated from the protos of the *installed* TorchServe.

TorchServe does not ship its ``.proto`` files loose in the wheel: they live inside
``ts/frontend/model-server.jar`` under ``proto/``. We extract ``inference.proto`` and
``management.proto`` from that jar and compile them with ``grpc_tools.protoc`` so the stubs
always match the server actually installed. Output goes to ``<repo>/build/grpc`` (git-ignored)
and is regenerated only when missing or when the jar (or grpcio-tools) changed; a stamp file
records the jar's sha256.

The generated ``*_pb2_grpc.py`` files do ``import inference_pb2`` as a top-level module, so the
output directory must be on ``sys.path`` before importing them: use :func:`load_stubs`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "build" / "grpc"
STAMP_NAME = "stubs.stamp.json"
PROTO_NAMES = ("inference", "management")
JAR_PROTO_DIR = "proto"
MODULE_NAMES = tuple(f"{name}{suffix}" for name in PROTO_NAMES for suffix in ("_pb2", "_pb2_grpc"))


@dataclass(frozen=True)
class Stubs:
    """The four generated modules."""

    inference_pb2: ModuleType
    inference_pb2_grpc: ModuleType
    management_pb2: ModuleType
    management_pb2_grpc: ModuleType


def torchserve_jar() -> Path:
    """Path of the frontend jar of the installed torchserve (``ts/frontend/model-server.jar``)."""
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torchserve is not installed: cannot find the 'ts' package")
    for location in spec.submodule_search_locations:
        jar = Path(location) / "frontend" / "model-server.jar"
        if jar.is_file():
            return jar
    raise RuntimeError(f"no frontend/model-server.jar in {list(spec.submodule_search_locations)}")


def googleapis_proto_dir() -> Path:
    """Include directory of googleapis-common-protos (the one holding google/rpc/status.proto)."""
    spec = importlib.util.find_spec("google.rpc")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / "status.proto").is_file():
            return Path(location).parent.parent
    raise RuntimeError(
        "google/rpc/status.proto not found: install googleapis-common-protos "
        f"(searched {locations})"
    )


def grpc_tools_proto_dir() -> Path:
    """grpc_tools' bundled well-known protos (google/protobuf/empty.proto, ...)."""
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("grpcio-tools is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "_proto"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tools_version() -> str:
    try:
        return version("grpcio-tools")
    except PackageNotFoundError:  # pragma: no cover - grpc_tools importable but no metadata
        return "unknown"


def _read_stamp(out_dir: Path) -> dict[str, object]:
    try:
        data = json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stamp(out_dir: Path, stamp: dict[str, object]) -> None:
    tmp = out_dir / f".{STAMP_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    os.replace(tmp, out_dir / STAMP_NAME)


def stubs_are_current(out_dir: Path | None = None, jar: Path | None = None) -> bool:
    """True when ``out_dir`` holds all four modules built from this very jar and grpcio-tools.

    Cheap when nothing changed (jar size and mtime match the stamp); otherwise the jar is hashed,
    and a merely touched jar (same sha256) refreshes the stamp instead of regenerating.
    """
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    jar = jar or torchserve_jar()
    if not all((out_dir / f"{name}.py").is_file() for name in MODULE_NAMES):
        return False
    stamp = _read_stamp(out_dir)
    if stamp.get("grpcio_tools") != _tools_version() or stamp.get("jar") != str(jar):
        return False
    st = jar.stat()
    if stamp.get("jar_size") == st.st_size and stamp.get("jar_mtime_ns") == st.st_mtime_ns:
        return True
    if stamp.get("jar_sha256") != _sha256(jar):
        return False
    _write_stamp(out_dir, {**stamp, "jar_size": st.st_size, "jar_mtime_ns": st.st_mtime_ns})
    return True


def generate_stubs(out_dir: Path | None = None, force: bool = False) -> Path:
    """Extract the protos from the installed TorchServe jar and compile them into ``out_dir``.

    Writes ``inference_pb2.py``, ``inference_pb2_grpc.py``, ``management_pb2.py`` and
    ``management_pb2_grpc.py`` (default directory ``<repo>/build/grpc``). Does nothing when
    the stubs are already current (see :func:`stubs_are_current`) unless ``force``.
    Returns the output directory.
    """
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    jar = torchserve_jar()
    if not force and stubs_are_current(out_dir, jar):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    st = jar.stat()
    jar_sha = _sha256(jar)
    # Build in a private directory next to out_dir, then move files in: concurrent callers
    # never see half-written modules.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".gen-") as tmp_name:
        tmp = Path(tmp_name)
        src, gen = tmp / "src", tmp / "gen"
        src.mkdir()
        gen.mkdir()
        with zipfile.ZipFile(jar) as archive:
            for name in PROTO_NAMES:
                member = f"{JAR_PROTO_DIR}/{name}.proto"
                try:
                    (src / f"{name}.proto").write_bytes(archive.read(member))
                except KeyError as exc:
                    raise RuntimeError(f"{member} not found in {jar}") from exc
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{src}",
            f"-I{grpc_tools_proto_dir()}",
            f"-I{googleapis_proto_dir()}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
            *(str(src / f"{name}.proto") for name in PROTO_NAMES),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"protoc failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr.strip()}"
            )
        for name in MODULE_NAMES:
            produced = gen / f"{name}.py"
            if not produced.is_file():
                raise RuntimeError(f"protoc did not produce {produced.name}")
            os.replace(produced, out_dir / produced.name)
    _write_stamp(
        out_dir,
        {
            "jar": str(jar),
            "jar_sha256": jar_sha,
            "jar_size": st.st_size,
            "jar_mtime_ns": st.st_mtime_ns,
            "grpcio_tools": _tools_version(),
            "modules": list(MODULE_NAMES),
        },
    )
    return out_dir


def load_stubs(out_dir: Path | None = None) -> Stubs:
    """Generate the stubs if needed, put their directory on ``sys.path`` and import them.

    If modules of the same names were already imported from another directory, they are
    dropped from ``sys.modules`` and re-imported from ``out_dir``.
    """
    out_dir = generate_stubs(out_dir).resolve()
    if str(out_dir) not in sys.path:
        sys.path.insert(0, str(out_dir))
    for name in MODULE_NAMES:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else None
        if module is not None and (origin is None or Path(origin).resolve().parent != out_dir):
            del sys.modules[name]
    importlib.invalidate_caches()
    modules = {name: _import_from(name, out_dir) for name in MODULE_NAMES}
    return Stubs(**modules)


def _import_from(name: str, directory: Path) -> ModuleType:
    """Import top-level module ``name`` from ``directory`` regardless of sys.path order."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
    if spec is None or spec.loader is None:  # pragma: no cover - file checked by generate
        raise ImportError(f"cannot load {name} from {directory}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
