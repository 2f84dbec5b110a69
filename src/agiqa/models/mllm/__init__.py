"""The MLLM side of stage one: the adapter that turns images into semantic vectors, and the
model families that transformers does not ship."""

from agiqa.models.mllm.adapter import SemanticEncoder
from agiqa.models.mllm.inputs import BatchPreparer, PromptEncoding, fuse_batches

__all__ = ["BatchPreparer", "PromptEncoding", "SemanticEncoder", "fuse_batches"]
