"""Plain PyTorch oracles (being written)."""
