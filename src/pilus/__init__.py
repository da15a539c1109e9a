"""pilus: eBPF networking, observability and security."""
__version__ = "0.1.0"
