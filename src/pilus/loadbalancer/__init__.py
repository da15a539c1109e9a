"""Services and backends: the Kubernetes Service model, Maglev, and the manager
that turns desired services into the datapath's LB maps."""
