"""mtad: the mail delivery daemon of HTML-mailing."""
