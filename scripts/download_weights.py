#!/usr/bin/env python3
"""Download a Segment Anything checkpoint, verify it and print its path.

Usage::

    python scripts/download_weights.py vit_b [--dest weights] [--base-url URL]
    python scripts/download_weights.py --url URL --sha256 HEX [--md5 HEX] [--dest weights]

An official checkpoint (``vit_b``, ``vit_l``, ``vit_h``) keeps its official name and is
verified against its published size, MD5 and SHA-256, also when it comes from a mirror
(``--base-url``, default ``$SAMSERVE_WEIGHTS_URL`` or Meta's host). Any other file
(``--url``) needs the digest it must have (``--md5`` and/or ``--sha256``); ``--no-verify``
takes it as it comes. Downloads are written atomically; a file already present that passes
the checks is not downloaded again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from samserve.weights import (
    DEFAULT_BASE_URL,
    OFFICIAL_CHECKPOINTS,
    DownloadError,
    DownloadOptions,
    Expected,
    VerificationError,
    download_checkpoint,
    download_file,
    file_name_from_url,
)

ENV_BASE_URL = "SAMSERVE_WEIGHTS_URL"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the command line; usage errors exit with status 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model_type",
        nargs="?",
        choices=sorted(OFFICIAL_CHECKPOINTS),
        help="an official checkpoint (or give --url instead)",
    )
    parser.add_argument(
        "--dest", type=Path, default=Path("weights"), help="directory (default: weights)"
    )
    parser.add_argument(
        "--base-url",
        default=None,
        help=f"a mirror of the official files (default: ${ENV_BASE_URL} or {DEFAULT_BASE_URL})",
    )
    parser.add_argument("--url", help="any other checkpoint; needs --md5/--sha256")
    parser.add_argument("--md5", help="the MD5 the --url file must have (32 hex digits)")
    parser.add_argument("--sha256", help="the SHA-256 the --url file must have (64 hex digits)")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="take the --url file without checking its digest",
    )
    parser.add_argument("--timeout", type=float, default=60, help="HTTP timeout in seconds")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    if (args.model_type is None) == (args.url is None):
        parser.error("give either an official model type or --url")
    has_digest = args.md5 is not None or args.sha256 is not None
    if args.model_type is not None:
        if has_digest or args.no_verify:
            parser.error(
                "--md5, --sha256 and --no-verify go with --url; "
                "official checkpoints are checked against their published digests"
            )
        args.base_url = args.base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL
    else:
        if args.base_url is not None:
            parser.error("--base-url is for official checkpoints; --url is the whole address")
        # Without a digest, whatever the server sends would be served as the model.
        if not has_digest and not args.no_verify:
            parser.error("--url needs --md5 and/or --sha256 (or --no-verify, explicitly)")
        if has_digest and args.no_verify:
            parser.error("--no-verify contradicts --md5/--sha256")
        try:
            args.expected = Expected(md5=args.md5, sha256=args.sha256)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the download; return the process exit code."""
    args = parse_args(argv)
    options = DownloadOptions(progress=not args.no_progress, timeout=args.timeout)
    try:
        if args.url is not None:
            dest = args.dest / file_name_from_url(args.url)
            path = download_file(args.url, dest, args.expected, options)
        else:
            path = download_checkpoint(args.model_type, args.dest, args.base_url, options)
    except (VerificationError, DownloadError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
