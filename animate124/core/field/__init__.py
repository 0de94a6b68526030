"""The 4-D field: hash-grid encodings (torch and Triton), the static + dynamic field with its MLPs, and the
time-sliced occupancy grid that skips empty space."""
