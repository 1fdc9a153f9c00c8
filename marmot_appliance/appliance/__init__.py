"""The local appliance: `plan`, `apply`, `status` and `destroy` for specs whose nodes all run on
this machine. Embedded nats-servers and node runtimes run as background processes with every
piece of state (configs, credentials, JetStream stores, logs, PIDs) under one state directory.
"""
