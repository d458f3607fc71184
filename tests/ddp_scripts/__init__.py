"""Scripts that tests launch as their own processes (multi-process runs); not test modules."""
