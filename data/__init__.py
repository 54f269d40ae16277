"""Datasets: readers for each release format, the prepared layout, transforms, synthetic data."""
