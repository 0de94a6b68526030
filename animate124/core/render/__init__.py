"""Volume rendering of the field, the cameras and rays of every view, and the frame times of a clip."""
