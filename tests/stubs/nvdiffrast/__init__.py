"""Import stand-in for nvdiffrast (tests only)."""
