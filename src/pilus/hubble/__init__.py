"""Hubble for pilus: datapath events -> flows (Hubble's flow.proto) in a ring buffer per
node, filters, and the Observer / Peer / health gRPC services of Hubble's public API.

Importing the package does nothing; ``pilus.hubble.protos`` generates the protobuf
modules on first use."""
