"""Import stand-in for IPython (tests and `animate124 launch-cpu`)."""
