"""Stage 2: seeds from CAMs, an Inter-pixel Relation Network, a sparse random walk, pseudo-labels."""
