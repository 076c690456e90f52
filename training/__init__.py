"""Offline training: phantoms, models, training, export and engine bundles for cadnode."""
