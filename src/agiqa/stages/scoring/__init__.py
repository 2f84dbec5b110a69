"""Scoring: a trained model on images, with vectors from a cache or the MLLM.

``scorer.py`` is :class:`agiqa.Scorer`; ``evaluate.py`` measures a model on a data set's split;
``vectors.py`` provides the vectors a model needs (its MLLM, the cache kinds); ``results.py``
holds the score report.
"""
