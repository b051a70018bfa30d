"""snncompile.neuron (being written)."""
