"""Clients for a running samserve TorchServe: REST, gRPC, key discovery, process control."""
