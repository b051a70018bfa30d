"""snncompile.layer (being written)."""
