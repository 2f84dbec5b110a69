"""The pipeline's stages: semantics (stage one), fit (stage two), score (inference)."""
