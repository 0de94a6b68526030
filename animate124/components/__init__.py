"""threestudio components, registered under the ``a124-`` prefix. Importing this package registers them.

Needs threestudio importable (launch.py does that); ``animate124.core`` never does.
"""
# importing the modules registers their a124-* names
from animate124.components import (  # noqa: F401
    data,
    exporter,
    geometry,
    guidance,
    prompt_processors,
    renderer,
    system,
)

REGISTERED_NAMES = (
    "a124-4d-volume",
    "a124-time-volume-renderer",
    "a124-image-video-datamodule",
    "a124-system",
    "a124-video-sds-guidance",
    "a124-video-prompt-processor",
    "a124-textual-inversion-prompt-processor",
    "a124-mesh-sequence-exporter",
    "a124-controlnet-tile-guidance",
)
