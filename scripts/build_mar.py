#!/usr/bin/env python
"""Build a self-contained SAM model archive (.mar) with torch-model-archiver.

The archive holds the checkpoint, the handler, the ``samserve`` package it imports,
the Python packages it needs (``requirements.txt``, installed by a TorchServe started
with ``install_py_dep_per_model=true``), and a ``model-config.yaml`` whose ``handler:``
section carries the model spec and the handler settings, so one handler serves every
SAM size. It sets no worker count: that is chosen at registration (``initial_workers``)
or with the scale API::

    python scripts/build_mar.py --spec vit_b --checkpoint weights/sam_vit_b_01ec64.pth
    python scripts/build_mar.py --spec sam_micro          # random weights, for tests
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from samserve.models import SamSpec, random_checkpoint, spec_by_name
from samserve.settings import Settings

REPO = Path(__file__).resolve().parent.parent

HANDLER = REPO / "handler" / "sam_handler.py"
PACKAGE = REPO / "handler" / "samserve"
REQUIREMENTS = REPO / "handler" / "requirements.txt"


def model_config(spec: SamSpec, settings: dict[str, Any]) -> dict[str, Any]:
    """The archive's model-config.yaml: TorchServe's batch keys plus ``handler:``.

    No ``minWorkers``/``maxWorkers``: in TorchServe 0.12 they override the
    ``initial_workers`` of a registration.
    """
    Settings.from_dict(settings)  # fail at build time, not at load time
    return {
        "batchSize": 4,
        # Milliseconds the frontend waits for a batch to fill: every request that finds
        # the worker idle waits this long, and 0 makes TorchServe 0.12 slower still
        # (docs/performance.md, *Batching in the frontend*).
        "maxBatchDelay": 1,
        "responseTimeout": 300,
        # Loading vit_h takes minutes on a CPU.
        "startupTimeout": 600,
        "handler": {"spec": spec.to_dict(), **settings},
    }


def build_archive(
    spec: SamSpec,
    checkpoint: Path,
    export_path: Path,
    model_name: str = "sam",
    version: str = "1.0",
    settings: dict[str, Any] | None = None,
    archive_format: str = "default",
    handler: Path = HANDLER,
) -> Path:
    """Run torch-model-archiver; returns the path of the archive in ``export_path``.

    ``archive_format`` "no-archive" writes a folder instead of a zipped ``.mar`` (fast
    for big checkpoints). ``handler`` is the handler file to pack (another one, such as
    the benchmark's ``scripts/naive_handler.py``, gets the same ``samserve`` package).
    """
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "extra"
        shutil.copytree(
            PACKAGE, staging / "samserve", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        config = Path(tmp) / "model-config.yaml"
        config.write_text(yaml.safe_dump(model_config(spec, settings or {}), sort_keys=False))
        command = [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name", model_name,
            "--version", version,
            "--serialized-file", str(checkpoint),
            "--handler", str(handler),
            "--extra-files", str(staging),
            "--config-file", str(config),
            "--requirements-file", str(REQUIREMENTS),
            "--export-path", str(export_path),
            "--archive-format", archive_format,
            "--force",
        ]  # fmt: skip
        subprocess.run(command, check=True)
    suffix = "" if archive_format == "no-archive" else ".mar"
    return export_path / f"{model_name}{suffix}"


def _parse_settings(pairs: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        settings[key] = yaml.safe_load(value)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="sam_micro", help="vit_b, vit_l, vit_h, sam_tiny, ...")
    parser.add_argument("--spec-file", type=Path, help="YAML SamSpec (overrides --spec)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="state dict to serve; without it, deterministic random weights (tests only)",
    )
    parser.add_argument("--model-name", default="sam")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--export-path", type=Path, default=REPO / "model_store")
    parser.add_argument("--archive-format", choices=["default", "no-archive"], default="default")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="handler setting, e.g. --set embedding_cache_mb=2048",
    )  # fmt: skip
    args = parser.parse_args(argv)

    spec = (
        SamSpec.from_dict(yaml.safe_load(args.spec_file.read_text()))
        if args.spec_file
        else spec_by_name(args.spec)
    )
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = REPO / "build" / "checkpoints" / f"{spec.name}_random.pth"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        random_checkpoint(spec, checkpoint)
        print(f"note: no --checkpoint; serving random weights for {spec.name}", file=sys.stderr)
    path = build_archive(
        spec,
        checkpoint,
        args.export_path,
        args.model_name,
        args.version,
        _parse_settings(args.set),
        args.archive_format,
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
