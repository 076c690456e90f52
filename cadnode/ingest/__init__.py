"""Ingest: what modalities send, received (C-STORE, MPPS), checked, spooled durably and
assembled into complete studies; who may associate."""
