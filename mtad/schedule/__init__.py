"""Scheduling: which leased recipients go out next, to which site, within the site's window and rate."""
