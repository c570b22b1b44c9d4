"""The server side's command-line programs: ``samserve-serve`` and ``samserve-demo``."""
