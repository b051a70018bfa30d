"""snncompile.passes (filled by later work)."""
