"""Offline training and evaluation of segsvc models (``segsvc train``, ``segsvc eval``).

The service never imports this package: retraining runs ``python -m training``
as a separate process.
"""
