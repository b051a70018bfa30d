"""snncompile.frontend (filled by later work)."""
