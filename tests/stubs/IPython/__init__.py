"""Import stand-in for IPython (tests only)."""
