"""FSDP2 on 2 CPU ranks (gloo): the masks of the same run in one process, bit for bit.

One ``torchrun`` launch of ``tests/fsdp_driver.py`` runs RigL, SET and LTH with ``--parallel fsdp``
(every parameter, gradient, optimizer state and mask sharded over the 2 ranks), a control whose ranks
grow differently, and a RigL run whose processes die right after its second sharded checkpoint; a
second launch resumes that one with ``prunus train --resume``. Each rank records, at every mask update,
the digests of the whole masks it computed and of the whole gradients it read.

The one-process reference runs here, with ``micro_batches=2``: it back-propagates the same two strided
half-batches the two ranks do and averages them as the ranks' reduce-scatter does, so its gradients,
weights and masks are the ranks' bit for bit. Equal per-update digests of the gradients show that
RigL's growth read the very same full gradient; a plain one-process run (one full-batch backward)
gives other gradient bits, which shows that the comparison is at the level of bits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from prunus.cli import main
from prunus.errors import CheckpointError, SpecError

from test_training_ddp import ROOT, _free_port, torchrun

pytest.importorskip("sklearn")
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
import fsdp_driver  # noqa: E402  (tests/fsdp_driver.py: the cases the torchrun launch runs)

RIGL = fsdp_driver.RESUME[:-3]  # the crash case's flags, without --checkpoint-every 3 --resume


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> Path:
    """The driver's outputs, a copy of the checkpoint it died after, and the resumed run's outputs."""
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=str(ROOT), PRUNUS_DIST_TIMEOUT="120")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for _ in range(2):  # a port taken between probing and binding: once more
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(ROOT / "tests" / "fsdp_driver.py"), str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode != 0 and "exitcode  : 17" in proc.stderr, log  # the crash case, as intended
    assert all((out / f"{c}.json").exists() for c in fsdp_driver.CASES) and (out / "ck-at-crash").is_dir(), log
    resumed = torchrun(out, [*fsdp_driver.RESUME, "--checkpoint-dir", str(out / "ck"),
                             "--json", str(out / "resumed.json")], timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 6" in resumed.stderr
    return out


def _ranks(folder: Path) -> tuple[dict, dict]:
    docs = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["world_size"] for d in docs] == [2, 2]
    return docs[0]["runs"][0], docs[1]["runs"][0]


def _one_process(tmp_path: Path, monkeypatch, name: str, micro_batches: int = 2) -> dict:
    """The driver's case ``name`` in this process (one thread, as each rank), its digests."""
    from prunus.training.trainer import TrainConfig, run

    method, sparsity, options = fsdp_driver.CASES[name]
    base = {**fsdp_driver.BASE, "parallel": "ddp", "micro_batches": micro_batches}
    monkeypatch.setenv("PRUNUS_DDP_DIGESTS", str(tmp_path / name))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(TrainConfig(method=method, sparsity=sparsity, options=options, **base), [0], progress=False,
            log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    return json.loads((tmp_path / name / "rank0.json").read_text())["runs"][0]


@needs_gloo
@pytest.mark.parametrize("name", sorted(fsdp_driver.CASES))
def test_fsdp_masks_identical_to_one_process(fsdp, tmp_path, monkeypatch, name):
    r0, r1 = _ranks(fsdp / name)
    one = _one_process(tmp_path, monkeypatch, name)
    assert r0["updates"] and r0["updates"] == r1["updates"] == one["updates"]  # [step, masks, gradients]
    assert r0["masks_sha"] == r1["masks_sha"] == one["masks_sha"]
    assert r0["params_sha"] == r1["params_sha"] == one["params_sha"]
    assert r0["metric"] == r1["metric"] == one["metric"]
    doc = json.loads((fsdp / f"{name}.json").read_text())
    run = doc["runs"][0]
    assert doc["world_size"] == 2 and doc["parallel"] == "fsdp" and run["masks_sha"] == one["masks_sha"]
    assert run["fsdp"]["mask_updates"] == len(one["updates"])
    assert doc["sparsity"] == pytest.approx(float(fsdp_driver.CASES[name][1]), abs=2e-3)
    steps = [u[0] for u in one["updates"]]
    # 512 / 64 = 8 steps per epoch, 16 in all; DST updates every 2 steps before 0.75 * 16 = 12. LTH
    # trains 2 phases of 2 epochs (32 steps), snapshots at step 4 (a quarter of its 16-step phase),
    # prunes and rewinds after step 16
    assert steps == ([2, 4, 6, 8, 10] if name in ("rigl", "set") else [16])
    if name == "rigl":  # the full-batch gradient of a plain run has other bits than the ranks' average
        plain = _one_process(tmp_path / "plain", monkeypatch, name, micro_batches=1)
        assert [u[2] for u in plain["updates"]] != [u[2] for u in one["updates"]]


@needs_gloo
def test_ranks_that_decide_differently_are_caught(fsdp):
    """A rank that grows elsewhere would keep its rows of another mask: the epoch check stops the run."""
    assert "ranks diverged after epoch 1" in (fsdp / "control.txt").read_text()


@needs_gloo
def test_killed_after_a_sharded_checkpoint_resumes_to_the_same_masks(fsdp):
    ck = fsdp / "ck-at-crash" / "seed0.dcp"
    manifest = json.loads((ck / "prunus-train.json").read_text())
    assert manifest["step"] == 6 and not manifest["done"]
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (fsdp / "ck-at-crash").iterdir()) == ["seed0.dcp"]  # no temporary left
    sharded = [e["path"] for e in manifest["entries"] if e["sharded"]]
    assert ["masks", "1"] in sharded and ["optim", "0", "momentum_buffer"] in sharded
    uninterrupted, _ = _ranks(fsdp / "rigl")
    r0, r1 = _ranks(fsdp / "digests")  # the resumed run's
    assert r0["masks_sha"] == r1["masks_sha"] == uninterrupted["masks_sha"]
    assert r0["params_sha"] == uninterrupted["params_sha"]
    assert r0["updates"] == [u for u in uninterrupted["updates"] if u[0] > 6] != []  # decided after the resume
    doc, ref = (json.loads((fsdp / f).read_text())["runs"][0] for f in ("resumed.json", "rigl.json"))
    assert doc["history"] == ref["history"] and doc["masks_sha"] == ref["masks_sha"]
    assert json.loads((fsdp / "ck" / "seed0.dcp" / "prunus-train.json").read_text())["done"]


@needs_gloo
def test_corrupt_foreign_or_other_mode_checkpoint_is_refused_before_any_work(fsdp, tmp_path, monkeypatch, capsys):
    from prunus.training.trainer import dcp
    from prunus.training.trainer.config import TrainConfig

    ck = tmp_path / "ck"
    shutil.copytree(fsdp / "ck-at-crash", ck)
    monkeypatch.setenv("WORLD_SIZE", "2")  # prepare() accepts --parallel fsdp; no group is ever joined
    argv = ["train", *RIGL, "--checkpoint-every", "3", "--checkpoint-dir", str(ck), "--resume", "--no-progress"]
    assert main([*argv, "--epochs", "3"]) == 2  # another run's checkpoint
    assert "was written for another run (epochs: checkpoint 2 vs run 3)" in capsys.readouterr().err
    shard = ck / "seed0.dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunus: error: checkpoint") and "is corrupt: __1_0.distcp" in err
    assert len(err.strip().splitlines()) == 1
    cfg = TrainConfig(**{**fsdp_driver.BASE, "method": "rigl", "options": (("delta_t", 2),), "checkpoint_dir": str(ck)})
    with pytest.raises(CheckpointError, match="corrupt"):
        dcp.check(dcp.dcp_path(cfg, 0), cfg)
    monkeypatch.delenv("WORLD_SIZE")
    assert main([a for a in argv if a not in ("--parallel", "fsdp")]) == 2  # one process: a .pt expected
    assert "was written by another parallel mode; resume it with FSDP2" in capsys.readouterr().err


# ---- without torchrun --------------------------------------------------------------------------------
def test_micro_batches_average_the_strided_halves_exactly():
    """Stepper with micro=2: the gradient is (g(x[0::2]) + g(x[1::2])) / 2, each the mean loss's."""
    from prunus.training.tasks import Dataset
    from prunus.training.trainer.steps import Stepper

    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    data = Dataset("t", "classification", x, y, x, y, 3)
    model = torch.nn.Linear(5, 3)
    want = []
    for j in (0, 1):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[j::2]), y[j::2]).backward()
        want.append(model.weight.grad.clone())
    with torch.no_grad():
        losses = [float(torch.nn.functional.cross_entropy(model(x[j::2]), y[j::2])) for j in (0, 1)]
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = Stepper(model, opt, data, world=1, micro=2)(None, x, y, 1.0)
    assert torch.equal(model.weight.grad, (want[0] + want[1]) / 2)
    assert torch.equal(model.weight.detach(), before - (want[0] + want[1]) / 2)
    assert loss == pytest.approx(sum(losses) / 2)


@pytest.mark.parametrize("flags, message", [
    (["--parallel", "fsdp"], "--parallel fsdp shards the model over ranks: launch with torchrun"),
    (["--micro-batches", "0"], "micro_batches must be at least 1, got 0"),
    (["--micro-batches", "3"], "batch size 64 must divide evenly over 1 rank(s) x 3 micro-batch(es)"),
])
def test_bad_parallel_flags_fail_in_one_line(capsys, flags, message):
    base = [a for a in RIGL if a not in ("--parallel", "fsdp")]
    assert main(["train", *base, *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunus: error:") and message in err and len(err.strip().splitlines()) == 1


def test_fingerprint_keeps_old_runs_and_tells_micro_batches_apart():
    from prunus.training.trainer.config import TrainConfig

    a = TrainConfig()
    assert "parallel" not in a.fingerprint() and "micro_batches" not in a.fingerprint()
    assert dataclasses.replace(a, parallel="fsdp").fingerprint() == a.fingerprint()
    assert dataclasses.replace(a, micro_batches=2).fingerprint()["micro_batches"] == 2
    with pytest.raises(SpecError, match="unknown parallel mode 'zero'"):
        TrainConfig(parallel="zero")


@pytest.fixture
def one_rank_group():
    """A 1-rank gloo group in this process: FSDP2 shards over one rank (DTensors, no peers)."""
    if not (dist.is_available() and dist.is_gloo_available()) or dist.is_initialized():
        pytest.skip("needs gloo and no process group yet")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_full_view_writes_back_only_what_a_hook_changed(one_rank_group):
    """The sharded mode's plumbing, hand-checked: reads leave shards alone, writes reach them."""
    from torch.distributed.fsdp import fully_shard

    from prunus.training.sharding import is_sharded
    from prunus.training.sparsifier import Sparsifier, find_targets

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))  # no dead rows
    targets = find_targets(model)
    masks = {t.name: torch.ones_like(t.weight, dtype=torch.bool) for t in targets}
    calls = []

    def update(sp, step):
        t = sp.targets[0]
        w = t.weight  # the whole weight, with its whole gradient
        calls.append((step, type(w).__name__, tuple(w.shape), w.grad is not None))
        if step == 2:  # prune row 0 of layer "0"; zero row 1's weights and momentum, as a grow does
            keep = torch.ones(6, 4, dtype=torch.bool)
            keep[0] = False
            sp.masks[t.name] = keep
            grown = torch.zeros(6, 4, dtype=torch.bool)
            grown[1] = True
            with torch.no_grad():
                w.masked_fill_(grown, 0.0)
            sp.mask_optimizer_state(w, ~grown)  # the whole stand-in: its shard's momentum is masked
        if step == 3:
            sp.masks[t.name] = torch.zeros(6, 4, dtype=torch.bool)
            raise RuntimeError("hook failed")

    sp = Sparsifier(model, None, targets, masks, spec=None, method="test", total_steps=3, update=update)
    fully_shard(model[0])  # (as the trainer does: the sparsifier first, then the shards, then the optimizer)
    fully_shard(model)
    opt = sp.optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    from prunus.training.sharding import attach

    sh = attach(sp)
    assert all(is_sharded(m) and m.placements == t.weight.placements for t, m in zip(targets, sp.masks.values()))
    w0 = model[0].weight
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    before, version = w0.to_local().clone(), w0.to_local()._version
    mom_before = opt.state[w0]["momentum_buffer"].to_local().clone()
    sp.step()  # step 1: the hook only reads
    assert calls == [(1, "Tensor", (6, 4), True)] and w0.to_local()._version == version
    assert torch.equal(w0.to_local(), before) and sh.updates == 0
    digest = sh.decision_digest()
    sp.step()  # step 2: row 0 pruned by the mask, row 1 zeroed in place by the hook
    local, mom = w0.to_local(), opt.state[w0]["momentum_buffer"].to_local()
    assert is_sharded(sp.masks["0"]) and torch.equal(sp.full_mask("0")[0], torch.zeros(4, dtype=torch.bool))
    assert torch.equal(local[0], torch.zeros(4)) and torch.equal(local[1], torch.zeros(4))
    assert torch.equal(local[2:], before[2:]) and torch.equal(mom[:2], torch.zeros(2, 4))
    assert torch.equal(mom[2:], mom_before[2:]) and bool((mom_before[:2] != 0).all())
    assert sh.updates == 1 and sh.decision_digest() != digest
    assert sp.densities()["0"] == pytest.approx(20 / 24) and sp.layer_sparsity()["0"] == pytest.approx(8 / 24)
    with pytest.raises(RuntimeError, match="hook failed"):
        sp.step()  # step 3: a failing hook leaves the masks it assigned unapplied
    assert is_sharded(sp.masks["0"]) and int(sp.full_mask("0").sum()) == 20
    assert [type(t).__name__ for t in sp.targets] == ["Target", "Target"] and sh.active is None


def test_full_params_reset_draws_what_one_process_draws(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    from prunus.training.sharding import attach
    from prunus.training.sparsifier import Sparsifier, find_targets

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))

    plain, model = build(), build()
    targets = find_targets(model)
    sp = Sparsifier(model, None, targets, {t.name: torch.ones_like(t.weight, dtype=torch.bool) for t in targets},
                    spec=None, method="test", total_steps=1)
    fully_shard(model[0])
    fully_shard(model)
    attach(sp)
    torch.manual_seed(7)
    for m in (plain[0], plain[2]):
        m.reset_parameters()
    torch.manual_seed(7)
    with sp.full_params() as m:
        assert not any(type(p).__name__ == "DTensor" for p in m.parameters())
        m[0].reset_parameters()
        m[2].reset_parameters()
    assert type(model[0].weight).__name__ == "DTensor"
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b.full_tensor())
