"""SMTP submission: aiosmtpd on the daemon's own loop, thin hooks that ask policy and await the store."""
