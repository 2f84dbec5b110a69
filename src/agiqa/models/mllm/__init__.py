"""The MLLM side of stage one: the adapter that turns images into semantic vectors, and the
model families that transformers does not ship."""

from agiqa.models.mllm.adapter import BatchPreparer, PromptEncoding, SemanticEncoder

__all__ = ["BatchPreparer", "PromptEncoding", "SemanticEncoder"]
