"""Import stand-in for nvdiffrast (tests and `animate124 launch-cpu`)."""
