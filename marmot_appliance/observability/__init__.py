"""Metrics, health and logging shared by every node process."""
