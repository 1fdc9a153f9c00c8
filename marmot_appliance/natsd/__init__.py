"""nats-server: finding the binary, rendering its configuration, running it as a child process."""
