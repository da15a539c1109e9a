"""DNS-aware policy (issue 11): the node's DNS proxy and the FQDN cache that toFQDNs selectors
read. ``matchpattern`` names and patterns, ``rules`` the proxy's rule sets, ``dnswire`` parsing
and building DNS messages (untrusted bytes), ``dnsproxy`` the transparent UDP/TCP proxy the
agent runs in its own process, ``cache`` the per-endpoint name -> IPs cache. See docs/fqdn.md."""
