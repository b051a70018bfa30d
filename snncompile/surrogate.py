"""snncompile.surrogate (being written)."""
