"""Backbone features of a data source, extracted once and cached on disk."""

from __future__ import annotations

from adamix_jax.features.extract import compute_features
from adamix_jax.features.extract import extract_features
from adamix_jax.features.extract import features_for_source

__all__ = ["compute_features", "extract_features", "features_for_source"]
