"""Hydra config group: ego-pipeline profiles."""
