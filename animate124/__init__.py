"""Animate124 for threestudio: one image plus a motion sentence to a 4D dynamic NeRF.

``animate124.core`` is framework-free (torch, diffusers, nerfacc); ``animate124.components`` holds the thin
threestudio classes registered under ``a124-*``; ``animate124.tools`` is the ``animate124`` command-line tool.
Importing this package imports nothing heavy.
"""

__version__ = "0.1.0"
