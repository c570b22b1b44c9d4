#!/usr/bin/env python
"""Start TorchServe with config.properties, register the model, stop it.

    python scripts/serve.py start --register sam.mar   # healthy, then registered
    python scripts/serve.py status
    python scripts/serve.py stop

The server runs from ``run/`` (its key_file.json, logs and pid file live there), so the
project's clients find its tokens without copying keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from samclient.rest_client import RestClient  # noqa: E402
from samclient.server import TorchServe  # noqa: E402


def default_workers() -> int:
    """One worker per GPU, or one on CPU."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "restart", "stop", "status", "register"])
    parser.add_argument("--register", metavar="ARCHIVE", help="archive in the model store")
    parser.add_argument("--model-name", default="sam")
    parser.add_argument("--workers", type=int, default=0, help="default: one per device")
    parser.add_argument("--workdir", type=Path, default=REPO / "run")
    parser.add_argument("--model-store", type=Path, default=REPO / "model_store")
    args = parser.parse_args(argv)

    server = TorchServe(args.workdir, args.model_store)
    if args.command in ("stop", "restart"):
        server.stop()
        print("TorchServe stopped")
    if args.command in ("start", "restart"):
        server.start()
        print(f"TorchServe healthy: inference {server.inference_url}, "
              f"management {server.management_url}, logs in {server.log_dir}")  # fmt: skip
    archive = args.register
    if args.command == "register" and archive is None:
        parser.error("register needs --register ARCHIVE")
    if archive:
        client = RestClient(server.inference_url, server.management_url, keys=server.keys())
        status = client.register_model(
            archive, args.model_name, initial_workers=args.workers or default_workers()
        )
        print(status)
    if args.command == "status":
        pid = server.pid()
        if pid is None:
            print("TorchServe is not running from", server.workdir)
            return 1
        client = RestClient(server.inference_url, server.management_url, keys=server.keys())
        print(f"TorchServe pid {pid}: {client.ping()}")
        print(json.dumps(client.list_models(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
