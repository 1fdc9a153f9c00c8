"""The per-node replication runtime: capture, codec, publisher, applier."""
