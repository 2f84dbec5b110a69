"""The pipeline's three stages: extraction (stage one), training (stage two) and scoring.

What they share sits beside them: ``configs.py`` (every command's options), ``rundir.py`` (the
run folder's files) and ``predict.py`` (decode once, predict in batches).
"""
