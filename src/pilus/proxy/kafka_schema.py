"""Kafka message schemas as data: the APIs and versions the Kafka proxy can parse.

A schema is a list of ``F(name, type, since, until, default)``. ``type`` is a primitive name
(``int8 int16 int32 int64 bool string bytes uuid``), ``"[int32]"`` / ``"[int64]"`` /
``"[string]"`` (an array of primitives) or a list of fields (an array of structs). ``since`` and
``until`` are the first and last version that carry the field. From an API's ``flexible``
version on, strings, bytes and arrays are compact and every struct ends with tagged fields
(kept raw, so a decoded message re-encodes byte for byte). Strings, bytes and arrays may be null
in any version (a -1 length decodes to None and encodes back to -1).

Field names are ours (one spelling for every API: a topic's name is ``name``, a partition's
index ``partition``) so the per-topic split and merge in ``kafka_rules`` is generic. The
versions stop where the request names topics by id (Fetch v13) or changes shape (OffsetFetch
v8 groups): the proxy clamps the broker's ApiVersions answer to ``API[k].max`` so clients stay
on versions it parses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["API", "API_NAMES", "AUTH_ERRORS", "F", "GROUP_AUTHORIZATION_FAILED", "Api", "TopicSpec"]

TOPIC_AUTHORIZATION_FAILED = 29
GROUP_AUTHORIZATION_FAILED = 30
CLUSTER_AUTHORIZATION_FAILED = 31
TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53
UNSUPPORTED_VERSION = 35
AUTH_ERRORS = (TOPIC_AUTHORIZATION_FAILED, GROUP_AUTHORIZATION_FAILED, CLUSTER_AUTHORIZATION_FAILED,
               TRANSACTIONAL_ID_AUTHORIZATION_FAILED)

#: Cilium's KafkaAPIKeyMap (lower case)
API_NAMES: dict[str, int] = {
    "produce": 0, "fetch": 1, "offsets": 2, "metadata": 3, "leaderandisr": 4, "stopreplica": 5,
    "updatemetadata": 6, "controlledshutdown": 7, "offsetcommit": 8, "offsetfetch": 9, "findcoordinator": 10,
    "joingroup": 11, "heartbeat": 12, "leavegroup": 13, "syncgroup": 14, "describegroups": 15, "listgroups": 16,
    "saslhandshake": 17, "apiversions": 18, "createtopics": 19, "deletetopics": 20, "deleterecords": 21,
    "initproducerid": 22, "offsetforleaderepoch": 23, "addpartitionstotxn": 24, "addoffsetstotxn": 25,
    "endtxn": 26, "writetxnmarkers": 27, "txnoffsetcommit": 28, "describeacls": 29, "createacls": 30,
    "deleteacls": 31, "describeconfigs": 32, "alterconfigs": 33, "alterreplicalogdirs": 34,
    "describelogdirs": 35, "saslauthenticate": 36, "createpartitions": 37, "createdelegationtoken": 38,
    "renewdelegationtoken": 39, "expiredelegationtoken": 40, "describedelegationtoken": 41, "deletegroups": 42,
}


@dataclass(frozen=True)
class F:
    name: str
    type: Any  # str or a list of F (an array of structs)
    since: int = 0
    until: int | None = None
    default: Any = None  # for answers the proxy builds itself; None: 0 / "" / [] by type

    def present(self, version: int) -> bool:
        return self.since <= version and (self.until is None or version <= self.until)


@dataclass(frozen=True)
class TopicSpec:
    """Where a request's topics are, and how its response carries per-topic errors."""

    parts_are_ints: bool = False  # the request lists partitions as bare int32s (OffsetFetch)
    topic_error: bool = False  # the response topic has its own error_code (Metadata)
    #: all topics denied: still ask the broker with no topics (Metadata v1+: the client needs
    #: the broker list, which only the broker has; v0 would read [] as all topics)
    forward_empty_from: int | None = None


@dataclass(frozen=True)
class Api:
    key: int
    name: str
    min: int
    max: int
    flexible: int  # the first flexible version (compact types, tagged fields, header v2/v1)
    request: tuple[F, ...]
    response: tuple[F, ...]
    topics: TopicSpec | None = None  # None: the request names no topics
    deny_error: int = CLUSTER_AUTHORIZATION_FAILED  # for a denied request without topics

    def is_flexible(self, version: int) -> bool:
        return version >= self.flexible


_PRODUCE = Api(0, "produce", 0, 10, 9, (
    F("transactional_id", "string", 3),
    F("acks", "int16"),
    F("timeout_ms", "int32"),
    F("topics", [F("name", "string"), F("partitions", [F("partition", "int32"), F("records", "bytes")])]),
), (
    F("topics", [F("name", "string"), F("partitions", [
        F("partition", "int32"), F("error_code", "int16"), F("base_offset", "int64", default=-1),
        F("log_append_time_ms", "int64", 2, default=-1), F("log_start_offset", "int64", 5, default=-1),
        F("record_errors", [F("batch_index", "int32"), F("message", "string")], 8),
        F("error_message", "string", 8)])]),
    F("throttle_time_ms", "int32", 1),
), TopicSpec())

_FETCH = Api(1, "fetch", 0, 12, 12, (
    F("replica_id", "int32", default=-1),
    F("max_wait_ms", "int32"),
    F("min_bytes", "int32"),
    F("max_bytes", "int32", 3),
    F("isolation_level", "int8", 4),
    F("session_id", "int32", 7),
    F("session_epoch", "int32", 7, default=-1),
    F("topics", [F("name", "string"), F("partitions", [
        F("partition", "int32"), F("current_leader_epoch", "int32", 9), F("fetch_offset", "int64"),
        F("last_fetched_epoch", "int32", 12), F("log_start_offset", "int64", 5),
        F("partition_max_bytes", "int32")])]),
    F("forgotten_topics", [F("name", "string"), F("partitions", "[int32]")], 7),
    F("rack_id", "string", 11),
), (
    F("throttle_time_ms", "int32", 1),
    F("error_code", "int16", 7),
    F("session_id", "int32", 7),
    F("topics", [F("name", "string"), F("partitions", [
        F("partition", "int32"), F("error_code", "int16"), F("high_watermark", "int64", default=-1),
        F("last_stable_offset", "int64", 4, default=-1), F("log_start_offset", "int64", 5, default=-1),
        F("aborted_transactions", [F("producer_id", "int64"), F("first_offset", "int64")], 4),
        F("preferred_read_replica", "int32", 11, default=-1), F("records", "bytes")])]),
), TopicSpec())

_LIST_OFFSETS = Api(2, "offsets", 0, 7, 6, (
    F("replica_id", "int32"),
    F("isolation_level", "int8", 2),
    F("topics", [F("name", "string"), F("partitions", [
        F("partition", "int32"), F("current_leader_epoch", "int32", 4), F("timestamp", "int64"),
        F("max_num_offsets", "int32", 0, 0)])]),
), (
    F("throttle_time_ms", "int32", 2),
    F("topics", [F("name", "string"), F("partitions", [
        F("partition", "int32"), F("error_code", "int16"), F("old_style_offsets", "[int64]", 0, 0),
        F("timestamp", "int64", 1, default=-1), F("offset", "int64", 1, default=-1),
        F("leader_epoch", "int32", 4, default=-1)])]),
), TopicSpec())

_METADATA = Api(3, "metadata", 0, 12, 9, (
    F("topics", [F("topic_id", "uuid", 10), F("name", "string")]),
    F("allow_auto_topic_creation", "bool", 4, default=True),
    F("include_cluster_authorized_operations", "bool", 8, 10),
    F("include_topic_authorized_operations", "bool", 8),
), (
    F("throttle_time_ms", "int32", 3),
    F("brokers", [F("node_id", "int32"), F("host", "string"), F("port", "int32"), F("rack", "string", 1)]),
    F("cluster_id", "string", 2),
    F("controller_id", "int32", 1, default=-1),
    F("topics", [
        F("error_code", "int16"), F("name", "string"), F("topic_id", "uuid", 10), F("is_internal", "bool", 1),
        F("partitions", [
            F("error_code", "int16"), F("partition", "int32"), F("leader_id", "int32"),
            F("leader_epoch", "int32", 7), F("replica_nodes", "[int32]"), F("isr_nodes", "[int32]"),
            F("offline_replicas", "[int32]", 5)]),
        F("topic_authorized_operations", "int32", 8, default=-2147483648)]),
    F("cluster_authorized_operations", "int32", 8, 10, default=-2147483648),
), TopicSpec(topic_error=True, forward_empty_from=1))

_OFFSET_COMMIT = Api(8, "offsetcommit", 0, 9, 8, (
    F("group_id", "string"),
    F("generation_id", "int32", 1, default=-1),
    F("member_id", "string", 1),
    F("group_instance_id", "string", 7),
    F("retention_time_ms", "int64", 2, 4, default=-1),
    F("topics", [F("name", "string"), F("partitions", [
        F("partition", "int32"), F("committed_offset", "int64"), F("committed_leader_epoch", "int32", 6),
        F("commit_timestamp", "int64", 1, 1), F("committed_metadata", "string")])]),
), (
    F("throttle_time_ms", "int32", 3),
    F("topics", [F("name", "string"), F("partitions", [F("partition", "int32"), F("error_code", "int16")])]),
), TopicSpec(), GROUP_AUTHORIZATION_FAILED)

_OFFSET_FETCH = Api(9, "offsetfetch", 0, 7, 6, (
    F("group_id", "string"),
    F("topics", [F("name", "string"), F("partitions", "[int32]")]),
    F("require_stable", "bool", 7),
), (
    F("throttle_time_ms", "int32", 3),
    F("topics", [F("name", "string"), F("partitions", [
        F("partition", "int32"), F("committed_offset", "int64", default=-1),
        F("committed_leader_epoch", "int32", 5, default=-1), F("metadata", "string"), F("error_code", "int16")])]),
    F("error_code", "int16", 2),
), TopicSpec(parts_are_ints=True), GROUP_AUTHORIZATION_FAILED)

_FIND_COORDINATOR = Api(10, "findcoordinator", 0, 3, 3, (
    F("key", "string"),
    F("key_type", "int8", 1),
), (
    F("throttle_time_ms", "int32", 1),
    F("error_code", "int16"),
    F("error_message", "string", 1),
    F("node_id", "int32", default=-1),
    F("host", "string"),
    F("port", "int32", default=-1),
), None, GROUP_AUTHORIZATION_FAILED)

_JOIN_GROUP = Api(11, "joingroup", 0, 7, 6, (
    F("group_id", "string"),
    F("session_timeout_ms", "int32"),
    F("rebalance_timeout_ms", "int32", 1),
    F("member_id", "string"),
    F("group_instance_id", "string", 5),
    F("protocol_type", "string"),
    F("protocols", [F("name", "string"), F("metadata", "bytes")]),
), (
    F("throttle_time_ms", "int32", 2),
    F("error_code", "int16"),
    F("generation_id", "int32", default=-1),
    F("protocol_type", "string", 7),
    F("protocol_name", "string", default=""),
    F("leader", "string"),
    F("member_id", "string"),
    F("members", [F("member_id", "string"), F("group_instance_id", "string", 5), F("metadata", "bytes")]),
), None, GROUP_AUTHORIZATION_FAILED)

_HEARTBEAT = Api(12, "heartbeat", 0, 4, 4, (
    F("group_id", "string"),
    F("generation_id", "int32"),
    F("member_id", "string"),
    F("group_instance_id", "string", 3),
), (
    F("throttle_time_ms", "int32", 1),
    F("error_code", "int16"),
), None, GROUP_AUTHORIZATION_FAILED)

_LEAVE_GROUP = Api(13, "leavegroup", 0, 4, 4, (
    F("group_id", "string"),
    F("member_id", "string", 0, 2),
    F("members", [F("member_id", "string"), F("group_instance_id", "string")], 3),
), (
    F("throttle_time_ms", "int32", 1),
    F("error_code", "int16"),
    F("members", [F("member_id", "string"), F("group_instance_id", "string"), F("error_code", "int16")], 3),
), None, GROUP_AUTHORIZATION_FAILED)

_SYNC_GROUP = Api(14, "syncgroup", 0, 4, 4, (
    F("group_id", "string"),
    F("generation_id", "int32"),
    F("member_id", "string"),
    F("group_instance_id", "string", 3),
    F("assignments", [F("member_id", "string"), F("assignment", "bytes")]),
), (
    F("throttle_time_ms", "int32", 1),
    F("error_code", "int16"),
    F("assignment", "bytes", default=b""),
), None, GROUP_AUTHORIZATION_FAILED)

_API_VERSIONS = Api(18, "apiversions", 0, 4, 3, (
    F("client_software_name", "string", 3),
    F("client_software_version", "string", 3),
), (
    F("error_code", "int16"),
    F("api_keys", [F("api_key", "int16"), F("min_version", "int16"), F("max_version", "int16")]),
    F("throttle_time_ms", "int32", 1),
))

_INIT_PRODUCER_ID = Api(22, "initproducerid", 0, 4, 2, (
    F("transactional_id", "string"),
    F("transaction_timeout_ms", "int32"),
    F("producer_id", "int64", 3, default=-1),
    F("producer_epoch", "int16", 3, default=-1),
), (
    F("throttle_time_ms", "int32"),
    F("error_code", "int16"),
    F("producer_id", "int64", default=-1),
    F("producer_epoch", "int16", default=-1),
))

#: API key -> what the codec knows about it
API: dict[int, Api] = {a.key: a for a in (
    _PRODUCE, _FETCH, _LIST_OFFSETS, _METADATA, _OFFSET_COMMIT, _OFFSET_FETCH, _FIND_COORDINATOR, _JOIN_GROUP,
    _HEARTBEAT, _LEAVE_GROUP, _SYNC_GROUP, _API_VERSIONS, _INIT_PRODUCER_ID)}

API_VERSIONS_KEY = 18
