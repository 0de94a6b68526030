"""The ``animate124`` command-line tool."""
