"""What each of the repository's three distributions ships, read from wheels built from
the working tree: the server's holds the server only, the training code's holds only
``training`` (no run checkpoints), so neither installs a package of the other's."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, zipfile.ZipFile]:
    """The server's and the training code's wheels, built without their dependencies
    and with this venv's setuptools (no index needed), by distribution name."""
    out = tmp_path_factory.mktemp("wheels")
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*pip, "-w", str(out), str(REPO), str(REPO / "training")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return {path.name.split("-")[0]: zipfile.ZipFile(path) for path in out.glob("*.whl")}


def top_level(wheel: zipfile.ZipFile) -> set[str]:
    """The wheel's top-level names, less its own metadata folder."""
    names = {name.split("/")[0] for name in wheel.namelist()}
    return {name for name in names if not name.endswith(".dist-info")}


def test_the_server_ships_the_server_only(wheels: dict[str, zipfile.ZipFile]) -> None:
    assert top_level(wheels["samserve"]) == {"samserve", "samserve_cli"}


def test_the_training_code_ships_its_modules_only(wheels: dict[str, zipfile.ZipFile]) -> None:
    training = wheels["samserve_training"]
    assert top_level(training) == {"training"}
    assert "training/train.py" in training.namelist()
    assert not [name for name in training.namelist() if name.endswith(".pth")]
