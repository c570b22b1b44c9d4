#!/usr/bin/env python
"""``samserve-demo`` (samserve_cli.demo) for the project's checkout: the web demo of the
TorchServe that scripts/serve.py runs from its run/, wherever this is run from.

    python scripts/demo.py     # prints http://127.0.0.1:8000/index.html#model=sam&key=...
"""

from __future__ import annotations

import sys
from pathlib import Path

from samserve_cli.demo import KEY_HEADER, PageKeys, Upstream, demo_url, main, serve

__all__ = ["KEY_HEADER", "PageKeys", "Upstream", "demo_url", "main", "serve"]

REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.exit(main(root=REPO))
