"""The training-set format: the folder Save Training Set / ``versat2i build-dataset`` write and the
trainer reads (kohya layout + a manifest). One package, so writer and reader cannot drift apart.

Layout::

    <root>/<name>/
        <repeats>_<aspect>/<id>.png          the kept image, 8-bit RGB PNG
        <repeats>_<aspect>/<id>.txt          its caption (the prompt, UTF-8, one line)
        <repeats>_<aspect>/<id>.latents.safetensors   optional: key "latents" [C,h,w]
        manifest.jsonl                       one JSON object per kept image (``manifest.ManifestEntry``)
        dataset.json                         summary: format version, aspects, repeats, counts

Modules: ``layout`` (names and the folder convention), ``manifest`` (manifest entries, reading a
written set), ``folders`` (scanning kohya folders as users curate them, and replay folders),
``writer`` (checking inputs, then writing a set atomically), ``cli`` (``versat2i build-dataset``).
"""
