"""Tenants: the customers of the service, their SMTP credentials and their sending domains."""
