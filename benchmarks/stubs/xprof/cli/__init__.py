"""Part of the xprof import stand-in (see `xprof/__init__.py`)."""
