"""Clients for a running samserve TorchServe: REST, gRPC, key discovery and renewal,
process control, masks and overlays, and the ``samserve-segment`` command (``cli``)."""
