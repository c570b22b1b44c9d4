#!/usr/bin/env python
"""Command line for training/evaluate.py (see its docstring)."""

import sys

from training.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
