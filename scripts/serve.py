#!/usr/bin/env python
"""``samserve-serve`` (samserve_cli.serve) for the project's checkout: TorchServe runs from
its run/ with its config.properties and model_store/, wherever this is run from.

    python scripts/serve.py start --register sam.mar
    python scripts/serve.py stop
"""

from __future__ import annotations

import sys
from pathlib import Path

from samserve_cli.serve import main

REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.exit(main(root=REPO))
