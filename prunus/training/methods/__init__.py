"""The sparse-training methods, one module each; importing a module registers its factories.

:func:`prunus.training.registry.load_all` imports every module of this package, so adding a method
is adding a file here that calls :func:`prunus.training.registry.register`.
"""
