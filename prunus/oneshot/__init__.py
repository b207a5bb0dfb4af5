"""One-shot pruning: the calibration loop, the pipeline behind ``prunus.prune``, block steps, the job runner.

Data flow: :mod:`~prunus.oneshot.job` (typed job from flags or a recipe) -> :mod:`~prunus.oneshot.runner`
(load, windows, every method and baseline, evaluate, save) -> :mod:`~prunus.oneshot.pipeline` (targets,
budgets, calibrated pruning, check) -> :mod:`~prunus.oneshot.calibrate` (the one block-by-block loop).
"""
