"""The `klvae` command: a thin layer over the library API."""
