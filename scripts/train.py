#!/usr/bin/env python
"""Command line for training/train.py (see its docstring)."""

import sys

from training.train import main

if __name__ == "__main__":
    sys.exit(main())
