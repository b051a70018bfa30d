"""snncompile.dynamics (filled by later work)."""
