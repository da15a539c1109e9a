"""Hubble's protobuf messages and gRPC stubs (flow, relay, observer, peer).

Importing this module generates them first when needed (pilus.hubble._codegen: from
the .proto files in ``proto/`` into ``_gen/``, which git ignores); everything else in
pilus imports the generated modules from here.
"""

from __future__ import annotations

from pilus.hubble import _codegen

_codegen.ensure()

from pilus.hubble._gen.flow import flow_pb2  # noqa: E402
from pilus.hubble._gen.observer import observer_pb2, observer_pb2_grpc  # noqa: E402
from pilus.hubble._gen.peer import peer_pb2, peer_pb2_grpc  # noqa: E402
from pilus.hubble._gen.relay import relay_pb2  # noqa: E402

__all__ = ["flow_pb2", "observer_pb2", "observer_pb2_grpc", "peer_pb2", "peer_pb2_grpc", "relay_pb2"]
