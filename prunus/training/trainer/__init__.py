"""The reference trainer behind ``prunus train``: one task, one model, one method, N seeds.

Split by job: :mod:`.config` (the frozen :class:`TrainConfig`, validation into :class:`Prepared`),
:mod:`.steps` (batches, optimizer, loss, evaluation), :mod:`.loop` (one seed, N seeds, the
summary), :mod:`.checkpoints` (atomic checkpoints and JSON, resume checks) and :mod:`.ddp`
(torchrun/gloo, identical masks on every rank). It is deterministic on CPU: a run killed (even with
SIGKILL) and resumed from its last checkpoint ends with the same masks and metrics as an
uninterrupted one. Only rank 0 logs, shows progress bars and writes checkpoints (and, in the CLI,
the table, JSON and plot).
"""

from prunus.training.trainer.checkpoints import (FORMAT, checkpoint_path, load_checkpoint, save_checkpoint,
                                                 write_json)
from prunus.training.trainer.config import Prepared, TrainConfig, prepare
from prunus.training.trainer.ddp import distributed, global_rank
from prunus.training.trainer.loop import DivergedError, run, summarize, train_one
from prunus.training.trainer.steps import evaluate

__all__ = ["FORMAT", "DivergedError", "Prepared", "TrainConfig", "checkpoint_path", "distributed", "evaluate", "global_rank",
           "load_checkpoint", "prepare", "run", "save_checkpoint", "summarize", "train_one", "write_json"]
