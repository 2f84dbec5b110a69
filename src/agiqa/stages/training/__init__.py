"""Stage two, training: the MANIQA backbone and the MoE head trained from cached vectors.

``fit.py`` sets up the data, split, model and outputs of a series of runs (one run is a series
of one); ``trainer.py`` is the official epoch loop; ``together.py`` trains the runs of a series
as one batched computation; ``norms.py`` holds the optional normalisations folded into the
saved model.
"""
