"""The promotion CLI: candidate → canary → production with gates and rollback."""
