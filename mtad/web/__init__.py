"""The HTTP listener: unsubscribe pages now; metrics and health checks share it."""
