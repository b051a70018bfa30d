"""snncompile.learning (being written)."""
