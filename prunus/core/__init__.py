"""The shared vocabulary of one-shot pruning and sparse training: specs, masks, targets, statistics.

Nothing here loads a model, reads a file or runs a calibration pass; every other layer may import it.
"""
