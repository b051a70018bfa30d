"""snncompile.runtime (filled by later work)."""
