"""The ledger: the only writer of instance state."""
