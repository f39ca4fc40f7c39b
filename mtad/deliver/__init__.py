"""Delivery: routes from DNS, pooled SMTP connections, one transaction per dispatch."""
