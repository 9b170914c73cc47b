"""Training the autoencoder: losses, data, the loop. Submodules are imported on demand (no heavy imports here)."""
