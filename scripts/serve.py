#!/usr/bin/env python
"""Start TorchServe with config.properties, register the model, renew keys, stop it.

    python scripts/serve.py start --register sam.mar   # healthy, then registered
    python scripts/serve.py status
    python scripts/serve.py renew-key --api inference  # a new key in run/key_file.json
    python scripts/serve.py stop

The server runs from ``run/`` (its key_file.json, logs and pid file live there), so the
project's clients find its tokens without copying keys. It listens where
config.properties says (``inference_address``, ``grpc_inference_address``, ...).
An expired key is renewed through TorchServe's token API when a call is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from samclient.keys import APIS  # noqa: E402
from samclient.rest_client import RestClient  # noqa: E402
from samclient.server import DEFAULT_CONFIG, TorchServe  # noqa: E402


def default_workers() -> int:
    """One worker per GPU, or one on CPU."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command", choices=["start", "restart", "stop", "status", "register", "renew-key"]
    )
    parser.add_argument("--register", metavar="ARCHIVE", help="archive in the model store")
    parser.add_argument("--model-name", default="sam")
    parser.add_argument("--workers", type=int, default=0, help="default: one per GPU, 1 on CPU")
    parser.add_argument("--api", choices=APIS, default="inference", help="key to renew")
    parser.add_argument("--workdir", type=Path, default=REPO / "run")
    parser.add_argument("--model-store", type=Path, default=REPO / "model_store")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)

    server = TorchServe(args.workdir, args.model_store, config=args.config)
    if args.command in ("stop", "restart"):
        server.stop()
        print("TorchServe stopped")
    if args.command in ("start", "restart"):
        server.start()
        print(f"TorchServe healthy: inference {server.inference_url}, "
              f"management {server.management_url}, logs in {server.log_dir}")  # fmt: skip
    client = RestClient(server.inference_url, server.management_url, keys=server.key_source())
    archive = args.register
    if args.command == "register" and archive is None:
        parser.error("register needs --register ARCHIVE")
    if archive:
        workers = args.workers or default_workers()
        print(client.register_model(archive, args.model_name, initial_workers=workers))
    if args.command == "renew-key":
        client.key_source.renew(args.api, server.management_url)
        print(f"new {args.api} key written to {server.key_file}")
    if args.command == "status":
        pid = server.pid()
        if pid is None:
            print("TorchServe is not running from", server.workdir)
            return 1
        print(f"TorchServe pid {pid}: {client.ping()}")
        print(json.dumps(client.list_models(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
