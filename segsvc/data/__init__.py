"""Datasets, image I/O, augmentation pipelines and the shared inference preprocessing."""
