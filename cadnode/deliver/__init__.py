"""Deliver: the outboxes (outbox.py: what the stages queue, and the retry rule), results to
PACS (dispatch.py, C-STORE), Storage Commitment, and the admin operations on dead letters."""
