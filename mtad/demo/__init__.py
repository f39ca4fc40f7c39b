"""`mtad demo`: the whole system on loopback (embedded PostgreSQL, simulated providers, the daemon) under load."""
