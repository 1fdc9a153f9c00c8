"""The node process: wires capture, publisher, consumers, HTTP endpoints and shutdown."""
