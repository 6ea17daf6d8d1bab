"""Flower ClientApp and the client tasks (classical now; quantum and edge later)."""
