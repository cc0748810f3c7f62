"""Datasets as server resources: uploaded or registered once, validated once, named by training jobs.

``registry.DatasetRegistry`` is the entry point (the server's ``DatasetService``
and training jobs call it); ``archive`` extracts untrusted uploads safely,
``ingest`` validates a dataset folder and writes its training spec, ``split``
assigns a deterministic train/val split, and ``content`` defines a dataset's
identity (its content hash) for both the server and the light client.

This ``__init__`` imports nothing: ``segsvc.client`` imports
``segsvc.datasets.content`` and must not load OpenCV through ``segsvc.data``.
"""
