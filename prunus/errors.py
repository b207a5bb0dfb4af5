"""The one exception family prunus raises for bad input.

Every error a user can cause (a bad spec, a missing file, a corrupt checkpoint) is a
``PrunusError``. Its message is one line that says what is wrong and, where it helps, what to do.
The CLI prints it as ``prunus: error: <message>`` and exits with status 2; library users catch it.
"""

from __future__ import annotations


class PrunusError(Exception):
    """Base class of every user-facing prunus error. The message is a single line."""


class SpecError(PrunusError, ValueError):
    """An invalid sparsity specification (``1.5``, ``5:4``, ``abc``, N:M on an indivisible layer)."""


class CheckpointError(PrunusError):
    """A checkpoint that is missing, truncated, tampered with, or in a refused format (pickle)."""


class DataError(PrunusError):
    """Calibration or evaluation data that cannot be used (missing, too short, bad options)."""


class ModelError(PrunusError):
    """A model that cannot be loaded or pruned (missing path, NaN weights, unsupported layout)."""


class SparsityCheckError(PrunusError):
    """The achieved sparsity does not meet the spec: raised after every prune, never silenced."""
