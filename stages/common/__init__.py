"""Pieces the stages share: backbones, training loop, metrics, CRF, parallel map."""
