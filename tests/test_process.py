"""samserve.process: the worker's process-wide tuning, done by one call and never on import."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samserve import matmul, process
from samserve.process import ProcessTuning, tune_process

HANDLER = Path(__file__).resolve().parent.parent / "handler"
ONEDNN = torch.backends.mkldnn.is_available()
BACKENDS = ["auto", "torch"] + (["onednn"] if ONEDNN else [])


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """The process-wide calls ``tune_process`` makes, in order; glibc's heap is left as it
    is (the test session would keep the setting), ``keep_freed_memory`` answering True."""
    made: list[str] = []
    set_num_threads, set_backend = torch.set_num_threads, matmul.set_backend

    def keep_freed_memory() -> bool:
        made.append("heap")
        return True

    def threads(count: int) -> None:
        made.append(f"threads {count}")
        set_num_threads(count)

    def backend(name: str) -> str:
        made.append(f"matmul {name}")
        return set_backend(name)

    monkeypatch.setattr(process, "keep_freed_memory", keep_freed_memory)
    monkeypatch.setattr(torch, "set_num_threads", threads)
    monkeypatch.setattr(matmul, "set_backend", backend)
    return made


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tuning sets torch's process-wide thread count; the session's is put back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_a_cpu_it_keeps_the_heap_then_sets_threads_and_the_backend(calls, backend):
    tuning = tune_process(torch.device("cpu"), 1, backend, {"GOMP_SPINCOUNT": "20000"})
    assert calls == ["heap", "threads 1", f"matmul {backend}"]
    assert tuning == ProcessTuning(1, matmul.resolve_backend(backend), True, None)
    assert torch.get_num_threads() == 1 and matmul.backend() == tuning.cpu_matmul


def test_on_another_device_torch_keeps_its_threads_and_products(calls):
    matmul.set_backend("torch")
    threads = torch.get_num_threads()
    tuning = tune_process(torch.device("cuda"), threads + 1, "onednn", {})
    assert calls == ["matmul torch", "heap"]  # the first is this test's own
    assert (tuning.threads, tuning.cpu_matmul, tuning.heap_kept) == (threads, "torch", True)
    assert torch.get_num_threads() == threads and matmul.backend() == "torch"


@pytest.mark.parametrize("threads, backend", [(0, "auto"), (1, "mkl")])
def test_bad_values_are_refused_before_anything_is_set(calls, threads, backend):
    with pytest.raises(ValueError, match="threads must be|cpu_matmul must be"):
        tune_process(torch.device("cpu"), threads, backend, {})
    assert calls == []


def test_the_openmp_warning_comes_with_the_tuning_and_stays_out_of_its_log_phrase(calls):
    tuning = tune_process(torch.device("cpu"), 2, "torch", {"PATH": "/usr/bin"})
    assert tuning.openmp_warning and "GOMP_SPINCOUNT=20000" in tuning.openmp_warning
    assert tune_process(torch.device("cpu"), 2, "torch", {"OMP_WAIT_POLICY": "PASSIVE"}) == (
        ProcessTuning(2, "torch", True, None)
    )
    assert str(tuning) == "2 torch threads, CPU matmul torch, heap kept"
    assert "GOMP" not in repr(tuning)


_IMPORTS = """
import ctypes, importlib, json, pkgutil, sys, torch

looked_up = []  # glibc's heap functions found through any ctypes.CDLL (mallopt, ...)


class RecordingCDLL(ctypes.CDLL):
    def __getitem__(self, name):
        if name.startswith("mall"):
            looked_up.append(name)
        return super().__getitem__(name)


ctypes.CDLL = RecordingCDLL
threads = torch.get_num_threads()
import samserve
names = [f"samserve.{m.name}" for m in pkgutil.iter_modules(samserve.__path__)]
for name in [*names, "sam_handler"]:
    importlib.import_module(name)
from samserve import matmul, process

imported = {
    "modules": len(names),
    "threads_unchanged": torch.get_num_threads() == threads,
    "backend": matmul.backend(),
    "libc_loads": process._libc.cache_info().misses,
    "looked_up": sorted(set(looked_up)),
}
tuning = process.tune_process(torch.device("cpu"), max(1, threads - 1), "torch", {})
tuned = {"heap_kept": tuning.heap_kept, "looked_up": sorted(set(looked_up))}
print(json.dumps({"imported": imported, "tuned": tuned}))
"""


def test_importing_samserve_and_the_handler_tunes_nothing():
    """In a fresh interpreter, importing every samserve module and the handler leaves
    torch's threads and products as they were, and never looks up glibc's ``mallopt`` or
    ``malloc_trim`` (every ctypes library opened is watched); ``tune_process`` then does."""
    path = os.pathsep.join(filter(None, [str(HANDLER), os.environ.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS],
        capture_output=True, text=True, check=True, timeout=300,
        env={**os.environ, "PYTHONPATH": path},
    ).stdout  # fmt: skip
    result = json.loads(out.splitlines()[-1])
    imported, tuned = result["imported"], result["tuned"]
    assert imported["modules"] > 10 and imported["threads_unchanged"], imported
    assert imported["backend"] == "torch" and imported["libc_loads"] == 0, imported
    assert not {"mallopt", "malloc_trim"} & set(imported["looked_up"]), imported
    if tuned["heap_kept"]:  # glibc: the watch does see the tuning's calls
        assert "mallopt" in tuned["looked_up"], tuned


class _Context:
    """The parts of TorchServe's worker context that ``SamHandler.initialize`` reads."""

    def __init__(self, model_dir: Path, handler: dict) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest = {"model": {"serializedFile": "sam_micro.pth"}}
        self.model_yaml_config = {"handler": handler}


def test_the_handler_tunes_once_before_it_builds_the_model(
    calls, monkeypatch, tmp_path, checkpoints, caplog
):
    monkeypatch.syspath_prepend(str(HANDLER))
    import sam_handler

    build_sam = sam_handler.build_sam

    def build(*args, **kwargs):
        calls.append("build")
        return build_sam(*args, **kwargs)

    monkeypatch.setattr(sam_handler, "build_sam", build)
    monkeypatch.setattr(sam_handler, "release_freed_memory", lambda: calls.append("release"))
    (tmp_path / "sam_micro.pth").symlink_to(checkpoints["sam_micro"])
    config = {"spec": {"name": "sam_micro"}, "torch_threads": 1, "cpu_matmul": "torch"}
    handler = sam_handler.SamHandler()
    with caplog.at_level(logging.INFO, logger=sam_handler.logger.name):
        handler.initialize(_Context(tmp_path, config))
    assert calls == ["heap", "threads 1", "matmul torch", "build", "release"]
    assert torch.get_num_threads() == 1 and matmul.backend() == "torch"
    # test_workers reads the thread count from this line
    assert re.search(r"SAM sam_micro on cpu, 1 torch threads, CPU matmul torch", caplog.text)
