"""snncompile.functional (being written)."""
