"""TCAN training on the user's videos: ``data`` (clip sets and the two stages' datasets), ``prepare`` (prepare-data)."""
