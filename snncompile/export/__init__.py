"""snncompile.export (filled by later work)."""
