"""ComfyUI-VersaT2I: generate -> score -> filter -> train aspect LoRAs -> mix them with a learned gate.

ComfyUI imports this folder as one module and calls ``comfy_entrypoint``. Nothing heavy is imported
here: the node modules (and through them torch, open_clip, diffusers...) load only when ComfyUI asks
for the node list, and the models themselves only when a node runs. This module exports no
``NODE_CLASS_MAPPINGS``: ComfyUI checks that first and would silently ignore the V3 entrypoint.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    from .nodes import VersaT2IExtension

    return VersaT2IExtension()
