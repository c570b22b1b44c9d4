#!/usr/bin/env python
"""Command line for training/train.py (see its docstring)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "handler")]

from training.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
