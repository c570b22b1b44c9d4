"""The model archive as a stock TorchServe meets it: its worker settings and the Python
packages it asks the server to install."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from build_mar import REQUIREMENTS, build_archive, model_config
from samserve.models import spec_by_name

REPO = Path(__file__).resolve().parent.parent
# What a stock TorchServe brings: the server, and the torch it runs (segment-anything
# imports torchvision, which TorchServe's install instructions put beside torch).
SERVER_SIDE = ("torchserve", "torch", "torchvision")


def requirements() -> list[Requirement]:
    """The lines of handler/requirements.txt."""
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def requirement_names() -> set[str]:
    """The distributions handler/requirements.txt names."""
    return {canonicalize_name(requirement.name) for requirement in requirements()}


def with_dependencies(names: set[str]) -> set[str]:
    """``names`` and every installed distribution they require, transitively."""
    found: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        found.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def handler_distributions() -> set[str]:
    """The installed distributions whose modules a worker imports for the handler, beyond
    what TorchServe's worker and torch import themselves (the archive's own ``samserve``
    package travels inside it)."""
    script = (
        "import sys, torch, ts.torch_handler.base_handler; before = set(sys.modules); "
        "import sam_handler; print(' '.join(sorted(set(sys.modules) - before)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO / "handler", capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    modules = {name.split(".")[0] for name in done.stdout.splitlines()[-1].split()}
    owners = metadata.packages_distributions()
    found = {canonicalize_name(d) for module in modules for d in owners.get(module, [])}
    return found - {"samserve"}


def test_the_archive_pins_no_worker_count():
    """In TorchServe 0.12 the archive's minWorkers/maxWorkers override the registration's
    initial_workers; workers are chosen at registration or by the scale API."""
    config = model_config(spec_by_name("sam_micro"), {})
    assert "minWorkers" not in config and "maxWorkers" not in config
    assert config["batchSize"] == 4


def test_the_archive_carries_its_requirements(tmp_path, checkpoints):
    """torch-model-archiver's --requirements-file: the file goes into the archive and the
    manifest names it (model_archiver/manifest_components/model.py), which a TorchServe
    started with install_py_dep_per_model=true installs (ModelManager.java)."""
    archive = build_archive(spec_by_name("sam_micro"), checkpoints["sam_micro"], tmp_path)
    with zipfile.ZipFile(archive) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        assert manifest["model"]["requirementsFile"] == "requirements.txt"
        assert mar.read("requirements.txt").decode() == REQUIREMENTS.read_text()


def test_requirements_cover_what_the_handler_imports_and_leave_torch_alone():
    names = requirement_names()
    assert not names & {"torch", "torchvision", "torchserve"}
    imported = handler_distributions()
    missing = imported - with_dependencies(names) - with_dependencies(set(SERVER_SIDE))
    assert not missing, f"the handler imports {sorted(missing)}, not in requirements.txt"
    assert {"segment-anything", "numpy", "pycocotools", "numba", "orjson"} <= imported
    for requirement in requirements():  # every bound admits what the project is tested with
        assert requirement.specifier.contains(metadata.version(requirement.name)), requirement
