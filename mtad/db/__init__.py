"""Database layer: the embedded PostgreSQL cluster, migrations and the queue's SQL."""
