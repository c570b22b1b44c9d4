#!/usr/bin/env python
"""``samserve-segment`` (samclient.cli.segment) run from the project's checkout: its
defaults are the checkout's config.properties, run/ and out/, wherever it is run from.

    python scripts/segment.py demo/example.jpg --point 160,175 --box 330,60,560,200
"""

from __future__ import annotations

import sys
from pathlib import Path

from samclient.cli.segment import main, parse_prompts, segment

__all__ = ["main", "parse_prompts", "segment"]

REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.exit(main(root=REPO))
