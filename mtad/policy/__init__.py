"""Every decision mtad makes, as pure code: no asyncio, no sockets, no database, no metrics, no clock reads.

`now` is always a parameter. tests/unit/test_policy_is_pure.py enforces this by reading the imports.
"""
