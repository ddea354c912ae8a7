"""No network at run time: what keeps the processes the pack starts from reaching the internet.

Every model the pack runs loads from local files, yet libraries it uses phone home on their own:
``import peft`` imports bitsandbytes (pulled in by the ``iqa`` extra), which asks the ``kernels``
package for a CPU kernel from the Hugging Face Hub (two DNS look-ups per process, and a warning);
huggingface_hub fetches an "agent harnesses" registry when it builds request headers. Each of them
stays local when the Hugging Face libraries are told they are offline, which is what
``OFFLINE_ENVIRONMENT`` says.

Where it applies: the processes the pack owns, the ``versat2i`` command (``go_offline`` before any
library loads) and every training process (the launcher passes ``offline_environment``). ComfyUI's
own process is left as it is (other custom nodes and ComfyUI-Manager download through it): the
pack's code there opens no connection (``tests/unit/test_offline.py`` checks the scorers with a
socket tripwire), and a download the user turned on (Load Scorers' option to download missing
weights) is the one thing that may reach the hub there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",  # huggingface_hub, and through it diffusers, transformers, kernels
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def offline_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``OFFLINE_ENVIRONMENT`` set, for a
    child process of the pack."""
    return {**(os.environ if base is None else base), **OFFLINE_ENVIRONMENT}


def go_offline() -> None:
    """Put this process offline (the ``versat2i`` command): the environment, and huggingface_hub's
    flag if it was imported already (it reads the environment once, at import)."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
