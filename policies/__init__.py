"""Policies: the diffusion policy head, its samplers, the slot observation encoder and evaluation in sim."""
