"""Deliver: the outbox of results to PACS (C-STORE), Storage Commitment, and the admin
operations on dead letters."""
