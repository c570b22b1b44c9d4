"""Training and evaluation tools for a small SAM: synthetic data (`training.synthetic`)."""
