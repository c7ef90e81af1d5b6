"""Clustering methods and their registry (see :mod:`.registry` and :mod:`.base`)."""
