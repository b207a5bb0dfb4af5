"""The checkpoint formats: each module here is one format, registered by being there.

:func:`prunus.export.registry.load_formats` imports every module of this package (``pkgutil``); a
module declares ``NAME`` and the verbs ``save``, ``load``, ``load_masks`` and ``read_metadata``,
and optionally ``sniff(folder) -> bool`` and ``PRIORITY`` for folders without ``prunus.json``.
"""
