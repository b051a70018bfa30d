"""snncompile.ann2snn (filled by later work)."""
