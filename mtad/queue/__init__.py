"""The durable queue: messages and recipients in PostgreSQL, claimed under leases."""
