"""Import stand-in for xprof, which tokamax imports for its own profiling helpers.

The suite never profiles through tokamax, so the GPU machine needs no xprof
wheel (a large one): `peers.py` puts this folder on `sys.path` only when the
real package is missing.
"""
