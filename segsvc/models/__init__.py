"""Segmentation networks behind one registry: ``build_model(ModelSpec)``."""

from segsvc.models.registry import MODELS, available_models, build_model

__all__ = ["MODELS", "available_models", "build_model"]
