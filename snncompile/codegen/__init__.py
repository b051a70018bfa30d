"""snncompile.codegen (filled by later work)."""
