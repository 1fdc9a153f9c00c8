"""Proving convergence: the verify service every node runs, the `verify` comparison and `repair`.

See docs/reliability.md for how divergence is told apart from lag, and docs/replication.md for
the request/reply subjects.
"""
