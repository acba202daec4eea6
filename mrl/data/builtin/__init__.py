"""Embedded example datasets (JSONL) for the tiny CPU recipes; see make_builtin.py."""
