"""The client's command-line programs (``samserve-segment``)."""
