"""Experiments that reproduce the seeds\x27 findings on phantoms."""
