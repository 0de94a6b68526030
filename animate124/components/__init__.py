"""threestudio components, registered under the ``a124-`` prefix. Importing this package registers them.

Needs threestudio importable (launch.py does that); ``animate124.core`` never does.
"""
from animate124.components import geometry, renderer  # noqa: F401  (register a124-* names)

REGISTERED_NAMES = (
    "a124-4d-volume",
    "a124-time-volume-renderer",
)
