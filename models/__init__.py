"""The base models the loop trains on, as the model families' table describes them: how a family is
detected from its files and loaded (``loading``), its diffusers pipeline for sampling
(``pipelines``) and its LoRA file format (``lora_files``). What differs between families is an
entry of ``architectures``, not a branch in the code that uses it.
"""
