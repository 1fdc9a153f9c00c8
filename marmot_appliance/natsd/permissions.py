"""What each NATS identity of a cluster may do: publish permissions per role.

One account, one user per node and one read-only user for feed readers and `watch` (see
docs/security.md for why users-with-permissions rather than accounts: every identity shares the
same streams, which accounts would split apart behind exports/imports).

Permissions are allow-lists of publish subjects, so what is not listed is refused by the
servers, for every client:

- a node publishes changes only on its own origin token (`<subject_prefix>-<shard>.<node id>`),
  writes the snapshot object store, manifest and lease, and may create / update (never purge or
  delete) the shard streams it needs;
- a reader publishes nothing but JetStream read requests (stream info, its own consumers, acks)
  and verify requests.

Nodes answer verify requests through `allow_responses` (a reply to a request they received,
once), never through a general right to publish on `_INBOX.>`, which would let a node forge
JetStream acknowledgements to other clients.

Nobody is allowed `$JS.API.STREAM.DELETE`, `$JS.API.STREAM.PURGE` of a shard stream, or
`$JS.API.STREAM.MSG.DELETE`; the shard streams are also created with deny_delete / deny_purge.
"""

from __future__ import annotations

from marmot_appliance.replication.sharding import shard_numbers
from marmot_appliance.spec.model import Cluster, ReplicationSettings

# Requests every client needs to read: account info, stream info/listing, direct and
# stored-message gets, its own (ephemeral or ordered) consumers, acks and flow control.
READ_REQUESTS = (
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.LIST",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.CONSUMER.>",
    "$JS.ACK.>",
    "$JS.FC.>",
)


def origin_subject(replication: ReplicationSettings, shard: int, origin: int) -> str:
    """The subject a node with id `origin` publishes shard `shard`'s changes on."""
    return f"{replication.subject(shard)}.{origin}"


def shard_stream_subjects(replication: ReplicationSettings, shard: int) -> list[str]:
    """What a shard stream captures: every origin's token under the shard subject."""
    return [f"{replication.subject(shard)}.*"]


def snapshot_streams(cluster: Cluster) -> list[str]:
    """The JetStream streams behind the snapshot object store, its manifest and its lease."""
    from marmot_appliance.snapshots.store import lease_bucket_name, manifest_bucket_name

    bucket = cluster.snapshot_bucket
    return [f"OBJ_{bucket}", f"KV_{manifest_bucket_name(bucket)}", f"KV_{lease_bucket_name(bucket)}"]


def snapshot_subjects(cluster: Cluster) -> list[str]:
    from marmot_appliance.snapshots.store import lease_bucket_name, manifest_bucket_name

    bucket = cluster.snapshot_bucket
    return [f"$O.{bucket}.>", f"$KV.{manifest_bucket_name(bucket)}.>", f"$KV.{lease_bucket_name(bucket)}.>"]


def node_publish_allow(cluster: Cluster, origins: list[int]) -> list[str]:
    """Publish subjects of a node identity that may publish as `origins` (its own id; every id
    for the shared identity of `user` / `nkey` auth)."""
    replication = cluster.replication
    shards = shard_numbers(replication.shards)
    allow = [origin_subject(replication, shard, origin) for origin in origins for shard in shards]
    from marmot_appliance.node.tombstone_collector import horizon_bucket_name

    horizon_bucket = horizon_bucket_name(replication.stream_prefix)
    streams = [replication.stream_name(shard) for shard in shards] + snapshot_streams(cluster) + [f"KV_{horizon_bucket}"]
    allow += [f"$JS.API.STREAM.CREATE.{name}" for name in streams]
    allow += [f"$JS.API.STREAM.UPDATE.{name}" for name in streams]
    # Deleting an object (an old snapshot, a failed upload) purges its chunks: only that stream.
    allow.append(f"$JS.API.STREAM.PURGE.OBJ_{cluster.snapshot_bucket}")
    allow += snapshot_subjects(cluster)
    # Tombstone collection: each node writes its horizon record (node/tombstone_collector.py).
    allow.append(f"$KV.{horizon_bucket}.>")
    allow += READ_REQUESTS
    return allow


def verify_requests(cluster: Cluster) -> list[str]:
    """The verify service's request subjects (verify/protocol.py): `marmot-appliance verify`
    asks the nodes for digests and, with `repair`, to re-publish rows they hold (with their
    original versions: it cannot change what converges)."""
    from marmot_appliance.verify.protocol import subject_prefix

    return [f"{subject_prefix(cluster.replication.stream_prefix)}.>"]


def reader_publish_allow(cluster: Cluster) -> list[str]:
    return list(READ_REQUESTS) + verify_requests(cluster)
