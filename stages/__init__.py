"""The science: one package per stage (cam, irn, seg) and the pieces they share (common)."""
