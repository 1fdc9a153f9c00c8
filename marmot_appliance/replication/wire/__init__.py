"""The wire codec: envelope, CBOR bounds, encoding and decoding (see replication/codec.py)."""
