"""Random models in the real folder layouts, for tests (tiny) and for timing and memory (full size)."""
