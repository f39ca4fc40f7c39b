"""Several mtad nodes on one PostgreSQL: membership, cluster-wide connection slots, shared backoff."""
