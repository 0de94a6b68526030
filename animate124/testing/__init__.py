"""Test helpers that ship with the package: tiny random models (``animate124 make-tiny-models``).

Nothing here is used by training itself; the smoke config asks the system to call ``make_tiny_models`` once.
"""
