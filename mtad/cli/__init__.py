"""The `mtad` command: the daemon and the operators' tools."""
