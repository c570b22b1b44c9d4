"""The client as a package of its own: it reads nothing beside itself, draws in the frame
the server segments, and installs alone, without torch or TorchServe, into a fresh venv
whose ``samserve-segment`` segments an image through the session's real TorchServe."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.utils import canonicalize_name
from PIL import Image

import samclient
from conftest import MODEL
from samclient.cli.segment import parser
from samclient.overlay import picture

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "samclient"
EXAMPLE = REPO / "demo" / "example.jpg"
# The server's side, and what only builds and tests use: none may come with the client.
NOT_FOR_THE_CLIENT = {
    "torch", "torchvision", "torchserve", "torch-model-archiver", "segment-anything",
    "numba", "opencv-python-headless", "grpcio-tools", "pytest", "samserve", "samserve-training",
}  # fmt: skip


def test_the_client_locates_nothing_beside_its_own_files():
    """Keys, configs and stubs are found from the current directory, the environment or
    arguments, never from where the package was installed."""
    package = Path(samclient.__file__).parent
    for module in package.rglob("*.py"):
        if module.name.endswith(("_pb2.py", "_pb2_grpc.py")) or module.name == "setup.py":
            continue  # compiled by protoc, or the build script (no part of the package)
        assert "__file__" not in module.read_text(), module


def test_the_command_lines_defaults_are_the_current_directorys():
    args = parser(Path()).parse_args(["photo.jpg"])
    assert (args.config, args.key_file) == (None, None)
    assert (args.workdir, args.out) == (Path("run"), Path("out") / "overlay.png")


def test_the_picture_is_the_page_asked_for_stretched_to_8_bits():
    ramp = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (30, 1))  # 30x100, 12 bits
    pages = [Image.fromarray(np.zeros_like(ramp)), Image.fromarray(ramp)]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    shown = picture(buffer.getvalue(), page=1, intensity_range=(0, 3960))
    assert shown.shape == (30, 100, 3) and shown.dtype == np.uint8
    assert shown[0, 0].tolist() == [0, 0, 0] and shown[0, -1].tolist() == [255, 255, 255]
    assert picture(buffer.getvalue(), page=0).max() == 0


def test_the_picture_is_upright_as_its_exif_orientation_says():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter: shown 40 wide and 60 high
    Image.new("RGB", (60, 40)).save(buffer, format="JPEG", exif=exif)
    assert picture(buffer.getvalue()).shape == (60, 40, 3)


def fresh_venv(root: Path) -> Path:
    """A new venv at ``root`` with the client installed from the working tree (its
    dependencies from the package index, or pip's cache); returns its ``bin``."""
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run(
        [*install, str(CLIENT)], env=clean_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "bin"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what points Python at this project's venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


def segment_command(bin_dir: Path, out: Path) -> list[str]:
    """``samserve-segment`` of the venv on the example image: a click and a box."""
    return [
        str(bin_dir / "samserve-segment"), str(EXAMPLE), "--point", "160,175",
        "--box", "330,60,560,200", "--model", MODEL, "--out", str(out),
    ]  # fmt: skip


@pytest.mark.integration
def test_the_client_installs_alone_and_its_command_line_segments(server, tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv")
    listed = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True, text=True, check=True, env=clean_env(),
    )  # fmt: skip
    installed = {canonicalize_name(p["name"]) for p in json.loads(listed.stdout)}
    assert "samserve-client" in installed
    assert not installed & NOT_FOR_THE_CLIENT, installed & NOT_FOR_THE_CLIENT

    # The server found through its config and key file, from a directory of neither.
    work = tmp_path / "work"
    work.mkdir()
    config = ["--config", str(server.workdir / "config.properties")]
    env = clean_env(SAMSERVE_KEY_FILE=str(server.key_file))
    responses = {}
    for api, extra in (("rest", []), ("grpc", ["--grpc"])):
        out = work / f"{api}.png"
        done = subprocess.run(
            [*segment_command(bin_dir, out), *config, *extra],
            capture_output=True, text=True, timeout=300, cwd=work, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "overlay written" in done.stdout
        with Image.open(out) as drawn, Image.open(EXAMPLE) as example:
            assert drawn.size == example.size
        responses[api] = json.loads(out.with_suffix(".json").read_text())
    assert len(responses["rest"]["results"]) == 2
    assert responses["rest"]["results"] == responses["grpc"]["results"]
