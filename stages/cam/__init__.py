"""Stage 1: a regularized classifier whose class activation maps say where the evidence is."""
