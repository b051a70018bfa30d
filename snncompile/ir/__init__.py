"""snncompile.ir (filled by later work)."""
