"""A simulated remote world on loopback (DNS server, SMTP sinks) for the demo and the tests."""
