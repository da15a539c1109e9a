"""IP address management: host-scope allocation from the node's pod CIDR."""

from pilus.ipam.hostscope import HostScopeIPAM, IPAMError, IPAMExhausted

__all__ = ["HostScopeIPAM", "IPAMError", "IPAMExhausted"]
