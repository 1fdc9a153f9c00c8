"""marmot-appliance: leaderless SQLite replication over NATS JetStream."""

__version__ = "0.1.0"
