"""Random tiny models and reference modules for tests, the demo and the benchmarks.

Nothing here is a trained model: the tiny MLLMs are built from config with random weights and
a tokenizer trained on the spot, so the whole pipeline runs offline.
"""
