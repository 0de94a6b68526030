"""Random models in the real folder layouts, for tests (tiny) and for timing and memory (full size).

``animate124 make-tiny-models`` writes them. Nothing here is used by training itself; the smoke config asks the system
to call ``make_tiny_models`` once.
"""
