"""Test harness: a private PostgreSQL per test session, databases per test, the daemon in- and out-of-process."""
