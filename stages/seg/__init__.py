"""Stage 3: a fully supervised segmenter trained on the pseudo-labels."""
