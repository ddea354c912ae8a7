"""The quality aspects and the rule for aspect names, defined once for the whole pack.

An aspect name becomes a folder name (``<repeats>_<aspect>``), part of file names, a TOML key
(``[aspects] name = "scorer"``) and a safetensors metadata value, so it is restricted to what is
safe in all of them: letters, digits, ``_`` and ``-``, starting with a letter or digit (no ``.``:
a dotted TOML key is a nested table).
"""

from __future__ import annotations

import re

# The four aspects of the VersaT2I paper, in the order the pack shows them.
ASPECTS = ("aesthetics", "alignment", "geometry", "lowlevel")

ASPECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
ASPECT_NAME_RULE = "letters, digits, '_' and '-' only, starting with a letter or digit"
# Long enough for any real name; keeps '<repeats>_<aspect>' and file names far below the OS limit.
ASPECT_NAME_MAX_LENGTH = 64


def aspect_name_problem(name: str, *, what: str = "aspect") -> str | None:
    """Why ``name`` cannot be an aspect name (None if it can), naming ``what`` and the rule."""
    if not isinstance(name, str) or not ASPECT_NAME.match(name):
        return f"{what} {name!r}: an aspect name uses {ASPECT_NAME_RULE}"
    if len(name) > ASPECT_NAME_MAX_LENGTH:
        return f"{what} {name[:20]!r}...: an aspect name has at most {ASPECT_NAME_MAX_LENGTH} characters"
    return None


def check_aspect_name(name: str, *, what: str = "aspect") -> str:
    """``name`` if it is a valid aspect name, else ``ValueError`` naming ``what`` and the rule."""
    problem = aspect_name_problem(name, what=what)
    if problem:
        raise ValueError(problem)
    return name
