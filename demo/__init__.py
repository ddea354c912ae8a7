"""The embedded demo world: a tiny text-to-image world (coloured shapes on plain backgrounds) in
which the four VersaT2I aspects can be measured honestly, for ``make demo`` and the tests.

- ``world``: renderer, caption grammar, loop / held-out prompt split, replay images.
- ``rewards``: analytic stand-ins for the four aspect scorers (``demo:<aspect>`` in the registry).
- ``model``: the base model's architecture (a tiny diffusers StableDiffusion folder) and tokenizer.
- ``train_base``: the offline script that trained the shipped weights (``weights/``).
- ``settings``: the loop settings the demo runs with, and why (measured).

Modules import torch / diffusers lazily where they can; nothing here downloads anything.
"""
