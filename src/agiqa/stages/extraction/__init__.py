"""Stage one, extraction: the MLLM run once per image and prompt, its vectors cached.

``extract.py`` plans shards from the image keys and runs the encoder over a pool of loader
processes; ``resume.py`` works out what a rerun still has to compute; ``official.py`` holds the
fingerprint of the official vectors (mPLUG-Owl2, official recipe).
"""
