"""Start TorchServe with config.properties, register the model, renew keys, stop it.

    samserve-serve start --register sam.mar   # healthy, then registered
    samserve-serve start --redis --register sam.mar   # workers share a Redis store
    samserve-serve status
    samserve-serve renew-key --api inference  # a new key in run/key_file.json
    samserve-serve stop

Run from the deployment's folder (``scripts/serve.py`` runs it for the project's
checkout from anywhere): the server runs from its ``run/`` (key_file.json, logs and pid
file live there), so the clients started in that folder find its keys without copying
them, and takes archives from its ``model_store/``. It listens where its
config.properties says (``inference_address``, ``grpc_inference_address``, ...). An
expired key is renewed through TorchServe's token API when a call is refused.

With ``--redis`` it first starts a redis-server of its own for the shared embedding store
(``samserve_cli.store_server``) and gives the workers its URL (``SAMSERVE_STORE_URL``);
``stop`` stops it too. Other hosts' servers join it with that URL (``run/store_url``;
start it with ``--redis-bind`` on an address they reach).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from samclient.keys import APIS
from samclient.rest_client import RestClient
from samclient.server import TorchServe
from samserve.store import STORE_URL_ENV

from .store_server import DEFAULT_MAXMEMORY_MB, DEFAULT_PORT, StoreServer


def default_workers() -> int:
    """One worker per GPU, or one on CPU."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def main(argv: list[str] | None = None, root: Path | None = None) -> int:
    """``samserve-serve``: one command to the server.

    Arguments:
      argv: the arguments (default: the command line's).
      root: the folder whose run/, model_store/ and config.properties the defaults name
        (default: the current directory).

    Returns:
      The exit status (1: ``status`` found no server).
    """
    root = root if root is not None else Path()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command", choices=["start", "restart", "stop", "status", "register", "renew-key"]
    )
    parser.add_argument("--register", metavar="ARCHIVE", help="archive in the model store")
    parser.add_argument("--model-name", default="sam")
    parser.add_argument("--workers", type=int, default=0, help="default: one per GPU, 1 on CPU")
    parser.add_argument("--api", choices=APIS, default="inference", help="key to renew")
    parser.add_argument("--workdir", type=Path, default=root / "run")
    parser.add_argument("--model-store", type=Path, default=root / "model_store")
    parser.add_argument("--config", type=Path, default=root / "config.properties")
    parser.add_argument("--redis", action="store_true", help="start a Redis shared store too")
    parser.add_argument("--redis-port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--redis-bind", default="127.0.0.1", help="address other hosts reach")
    parser.add_argument("--redis-maxmemory-mb", type=int, default=DEFAULT_MAXMEMORY_MB)
    args = parser.parse_args(argv)

    server = TorchServe(args.workdir, args.model_store, config=args.config)
    store = StoreServer(args.workdir, args.redis_port, args.redis_bind, args.redis_maxmemory_mb)
    if args.command in ("stop", "restart"):
        server.stop()
        print("TorchServe stopped")
        if store.stop():
            print("Redis stopped")
    if args.command in ("start", "restart"):
        if args.redis:
            # The workers inherit the frontend's environment, which is this one.
            os.environ[STORE_URL_ENV] = store.start()
            print(f"Redis shared store on {args.redis_bind}:{args.redis_port} "
                  f"(its URL, with the password, in {store.url_file})")  # fmt: skip
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
