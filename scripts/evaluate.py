#!/usr/bin/env python
"""Command line for training/evaluate.py (see its docstring)."""

import sys
from pathlib import Path

# The lent GPU machine runs this from a bare checkout (scripts/device_train.sh), where the
# project is not installed: its packages are found in the checkout.
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "handler")]

from training.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
