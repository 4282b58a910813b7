"""Benchmarks of dbmux against direct access and PgBouncer; run with `python -m bench`."""
