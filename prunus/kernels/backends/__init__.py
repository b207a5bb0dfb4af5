"""The kernel backends: each module here registers its kernels when imported.

:func:`prunus.kernels.registry.load_backends` imports every module of this package (``pkgutil``),
so a new kernel is one new file here that calls
:func:`~prunus.kernels.registry.register_kernel`; nothing else names it.
"""
