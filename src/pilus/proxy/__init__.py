"""The transparent L7 proxy (issue 10, part A): HTTP/1.1 and HTTP/2 / gRPC with Cilium's
PortRuleHTTP semantics, as a process of its own (``python -m pilus.proxy``). See docs/l7.md."""
