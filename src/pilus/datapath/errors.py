"""The one error type of the datapath room (BPF objects, maps, links, netlink)."""


class DatapathError(Exception):
    """A datapath operation failed; the message says what went wrong and what to do."""
