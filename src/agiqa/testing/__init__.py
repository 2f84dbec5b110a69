"""Reference modules for tests and benchmarks.

Nothing here is a trained model or used by the pipeline itself.
"""
