"""Watching mtad: structured logs, systemd notifications (metrics and health arrive with the operations work)."""
