"""Bridges from other training libraries into itermerge's checkpoints and merges (each imports its library lazily)."""
