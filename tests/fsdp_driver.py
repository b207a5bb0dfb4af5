"""Several FSDP2 training runs in one ``torchrun`` launch, for ``tests/test_training_fsdp.py``.

``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_driver.py OUT`` joins one gloo group
and runs, with ``PRUNUS_DDP_DIGESTS=OUT/<case>`` (every rank's per-update digests of the
whole masks and gradients, and the final mask and parameter digests):

1. each case of :data:`CASES` (``--parallel fsdp``), its summary in ``OUT/<case>.json``;
2. the control: SET with a random grow that differs per rank (the generator seeded with the rank). Each
   rank keeps its own rows of a different mask, so the run must stop with "ranks diverged"; the
   message goes to ``OUT/control.txt``;
3. RigL with a sharded checkpoint every 3 steps, the processes exiting (status 17, as if killed) right
   after the second checkpoint (step 6), with nothing cleaned up; rank 0 first copies the checkpoint
   folder to ``OUT/ck-at-crash``. The test resumes the run with ``prunus train`` and :data:`RESUME`.

(torchrun's ``--max-restarts`` could resume in the same launch, but the restarted ranks' gloo
rendezvous was seen to connect to a dead rank's address, so the test launches twice.) One launch for
all the rest keeps the test fast: starting torch costs more than these runs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from prunus.errors import PrunusError
from prunus.training.trainer import TrainConfig, run, write_json
from prunus.training.trainer import loop

BASE = dict(task="digits", model="lenet300", epochs=2, batch_size=64, train_subset=512, parallel="fsdp")
CASES = {  # name: (method, sparsity, options)
    "rigl": ("rigl", "0.9", (("delta_t", 2),)),
    "set": ("set", "0.9", (("delta_t", 2),)),
    "lth": ("lth", "0.8", (("rounds", 1), ("rewind", 0.25))),
}
CRASH = TrainConfig(method="rigl", sparsity="0.9", options=(("delta_t", 2),), checkpoint_every=3, **BASE)
RESUME = ["--task", "digits", "--model", "lenet300", "--method", "rigl", "--sparsity", "0.9",
          "--epochs", "2", "--batch-size", "64", "--train-subset", "512", "-o", "delta_t=2", "--parallel", "fsdp",
          "--checkpoint-every", "3", "--resume"]


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    quiet = dict(progress=False, log=lambda s: None)
    for name, (method, sparsity, options) in CASES.items():
        os.environ["PRUNUS_DDP_DIGESTS"] = str(out / name)
        doc = run(TrainConfig(method=method, sparsity=sparsity, options=options, **BASE), [0], **quiet)
        if rank == 0:
            write_json(str(out / f"{name}.json"), doc)

    from prunus.training.methods import dst
    from prunus.training.sparsifier import generator

    os.environ["PRUNUS_DDP_DIGESTS"] = str(out / "control")
    dst.generator = lambda seed, tag: generator(seed + rank, tag)  # each rank grows elsewhere
    try:
        run(TrainConfig(method="set", sparsity="0.9", options=(("delta_t", 2),), **BASE), [0], **quiet)
        message = "no error"
    except PrunusError as e:
        message = str(e)
    dst.generator = generator
    if rank == 0:
        (out / "control.txt").write_text(message)

    os.environ["PRUNUS_DDP_DIGESTS"] = str(out / "crash")
    snapshot, count = loop._Run.snapshot, [0]

    def snapshot_then_die(self, *a, **kw):
        snapshot(self, *a, **kw)
        count[0] += 1
        if count[0] == 2:
            dist.barrier()
            if rank == 0:
                shutil.copytree(out / "ck", out / "ck-at-crash")  # for the test (the resume replaces it)
            dist.barrier()
            os._exit(17)  # no clean-up, no further checkpoint: a kill right after the second one

    loop._Run.snapshot = snapshot_then_die
    run(dataclasses.replace(CRASH, checkpoint_dir=str(out / "ck")), [0], **quiet)
    raise SystemExit("the crash case did not stop after its second checkpoint")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
