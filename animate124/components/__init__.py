"""threestudio components, registered under the ``a124-`` prefix. Importing this package registers them.

Needs threestudio importable (launch.py does that); ``animate124.core`` never does. One module per registered kind;
the test-only oracle guidances live in ``animate124.testing.oracle_guidance``.
"""
import importlib

from animate124.components.host_compat import register_config_resolvers

COMPONENTS = {  # registered name -> the module of this package that registers it
    "a124-4d-volume": "geometry",
    "a124-time-volume-renderer": "renderer",
    "a124-image-video-datamodule": "data",
    "a124-system": "system",
    "a124-video-sds-guidance": "video_sds_guidance",
    "a124-controlnet-tile-guidance": "controlnet_tile_guidance",
    "a124-video-prompt-processor": "video_prompt_processor",
    "a124-textual-inversion-prompt-processor": "textual_inversion_prompt_processor",
    "a124-mesh-sequence-exporter": "exporter",
}
REGISTERED_NAMES = tuple(COMPONENTS)

register_config_resolvers()  # before launch.py parses a config that names them
for _module in dict.fromkeys(COMPONENTS.values()):
    importlib.import_module(f"{__name__}.{_module}")
