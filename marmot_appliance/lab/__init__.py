"""A lab of real systemd hosts without VMs (docs/deploy.md, "The lab": what it builds and its safety rules).

Each host a spec names becomes a systemd-nspawn container booted into its own network
namespace, reachable over ssh from a controller namespace; the namespaces hang off a bridge in
a switch namespace. Everything the lab creates is recorded and torn down by `lab_down`.
"""
