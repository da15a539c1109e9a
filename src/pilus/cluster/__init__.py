"""Local multi-node clusters on one machine (node namespaces, underlay bridge, agents).

See :mod:`pilus.cluster.manager` for the API and :mod:`pilus.cluster.supervisor` for
the daemon that keeps the agents running."""

from pilus.cluster.manager import (
    cluster_down,
    cluster_names,
    cluster_up,
    healthy,
    load_cluster,
    node_remove,
    unix_http,
)
from pilus.cluster.plan import ClusterError, ClusterSpec

__all__ = [
    "ClusterError",
    "ClusterSpec",
    "cluster_down",
    "cluster_names",
    "cluster_up",
    "healthy",
    "load_cluster",
    "node_remove",
    "unix_http",
]
