#!/usr/bin/env python3
"""Download an official Segment Anything checkpoint and print its path.

Usage::

    python scripts/download_weights.py vit_b [--dest weights] [--base-url URL]

The base URL defaults to ``$SAMSERVE_WEIGHTS_URL`` or the official Meta host. The download is
verified against the SHA-256 prefix embedded in the checkpoint name and written atomically;
an already present, valid checkpoint is not downloaded again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "handler"))

from samserve.weights import (  # noqa: E402
    DEFAULT_BASE_URL,
    OFFICIAL_CHECKPOINTS,
    ChecksumError,
    DownloadError,
    download_checkpoint,
    download_file,
    expected_hash_prefix,
)

ENV_BASE_URL = "SAMSERVE_WEIGHTS_URL"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_type", choices=sorted(OFFICIAL_CHECKPOINTS))
    parser.add_argument(
        "--dest", type=Path, default=Path("weights"), help="directory (default: weights)"
    )
    parser.add_argument(
        "--base-url",
        default=os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL,
        help=f"where the checkpoints live (default: ${ENV_BASE_URL} or {DEFAULT_BASE_URL})",
    )
    parser.add_argument("--timeout", type=float, default=60, help="HTTP timeout in seconds")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    # Hidden: fetch a differently named (still hash-named) file, for mirrors and tests.
    parser.add_argument("--filename", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the download; return the process exit code."""
    args = parse_args(argv)
    progress = not args.no_progress
    try:
        if args.filename:
            url = args.base_url.rstrip("/") + "/" + args.filename
            prefix = expected_hash_prefix(args.filename)
            path = download_file(url, args.dest / args.filename, prefix, progress, args.timeout)
        else:
            path = download_checkpoint(
                args.model_type, args.dest, args.base_url, progress, args.timeout
            )
    except (ChecksumError, DownloadError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
