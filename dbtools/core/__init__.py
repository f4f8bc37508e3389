"""Foundations every stage shares: atomic writes, the user-error class, environment probes,
seeds and reading hand-written text files. Imports no other dbtools package."""
