"""bench/frontier.py's activation sparsity rows: which rows, the prune / export commands they run,
and the guard that lists them as skipped where ``prunus.activation`` is absent (nothing is run)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _frontier():
    spec = importlib.util.spec_from_file_location("bench_frontier", BENCH / "frontier.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_activation_rows():
    fr = _frontier()
    rows = fr.rows_wanted(fr.parser().parse_args([]))
    act = [r for r in rows if r.get("act")]
    assert len(act) == 3 * 2 * 3
    assert [r["name"] for r in act[:4]] == ["prunus 0 +act25% teal", "prunus 0 +act25% wina",
                                            "prunus 0 +act25% uniform", "prunus 0 +act40% teal"]
    assert {r["spec"] for r in act} == {"0", "2:4+int8", "0.5+int8"}
    assert {(r["act"]["sparsity"], r["act"]["method"]) for r in act} == {
        (s, m) for s in (0.25, 0.4) for m in ("teal", "wina", "uniform")}
    assert not any(r.get("act_int8") or r.get("compile") for r in act)  # no W8A8 / compile twins
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)) and "prunus 2:4+int8" in names and "dense fp32" in names
    none = fr.rows_wanted(fr.parser().parse_args(["--act-specs", ""]))
    assert not any(r.get("act") for r in none)
    one = fr.rows_wanted(fr.parser().parse_args(["--only", "prunus 2:4+int8 +act40% wina"]))
    assert [r["act"] for r in one] == [{"sparsity": 0.4, "method": "wina"}]


def test_prepare_runs_prune_with_the_activation_flags(tmp_path, monkeypatch):
    fr = _frontier()
    a = fr.parser().parse_args(["--work", str(tmp_path)])
    cmds = []

    def fake_run(cmd, log):
        cmds.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fr, "_run", fake_run)
    rows = {r["name"]: r for r in fr.rows_wanted(a)}
    rt = fr.prepare(rows["prunus 0 +act25% teal"], a, print)
    prune, export = cmds
    assert prune[prune.index("--method") + 1] == "magnitude" and prune[prune.index("--sparsity") + 1] == "0"
    assert prune[-4:] == ["--activation-sparsity", "0.25", "--activation-method", "teal"]
    assert export[3:5] == ["export", prune[prune.index("--out") + 1]] and "--runtime" in export
    assert rt.name == "rt-sparsegpt_0_act0_25_teal"
    cmds.clear()
    fr.prepare(rows["prunus 2:4+int8 +act40% uniform"], a, print)
    assert cmds[0][cmds[0].index("--method") + 1] == "sparsegpt"
    assert cmds[0][-4:] == ["--activation-sparsity", "0.4", "--activation-method", "uniform"]
    cmds.clear()
    fr.prepare(rows["prunus 2:4+int8"], a, print)  # the row without gates: no flags, its own folder
    assert "--activation-sparsity" not in cmds[0] and cmds[0][cmds[0].index("--out") + 1].endswith("ck-sparsegpt_2_4_int8")


def test_activation_rows_are_skipped_without_the_package(tmp_path, monkeypatch, capsys):
    fr = _frontier()
    monkeypatch.setattr(fr, "activation_available", lambda: False)
    monkeypatch.setattr(fr, "_run", lambda cmd, log: (_ for _ in ()).throw(AssertionError(cmd)))
    out = tmp_path / "f.json"
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--only", "prunus 0.5+int8 +act25% wina", "--work",
                                      str(tmp_path), "--json", str(out), "--skip-llamacpp"])
    assert fr.main() == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["name"] == "prunus 0.5+int8 +act25% wina" and row["error"].startswith("skipped")
    assert "skipped" in capsys.readouterr().out


def test_structured_rows_prune_flap_with_recovery_and_name_their_llamacpp_rows(tmp_path, monkeypatch):
    fr = _frontier()
    a = fr.parser().parse_args(["--work", str(tmp_path)])
    rows = {r["name"]: r for r in fr.rows_wanted(a)}
    row = rows["prunus mlp@0.270833 flap+bias+rec"]
    assert row["structured"] and row["spec"] == "mlp@0.270833"
    cmds = []
    monkeypatch.setattr(fr, "_run", lambda cmd, log: cmds.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    fr.prepare(row, a, print)
    prune = cmds[0]
    assert prune[prune.index("--method") + 1] == "flap"
    for flag, value in (("--format", "dense"), ("--structure-allocation", "uniform"), ("--reconstruct", "4")):
        assert prune[prune.index(flag) + 1] == value
    assert "--compensate" in prune and prune[prune.index("--out") + 1].endswith("ck-flap_mlp_0_270833")
    names = [n for n, _, _ in fr.llama_names(a)]
    assert names == ["llama.cpp Q8_0", "llama.cpp Q4_1", "llama.cpp F16",
                     "llama.cpp Q8_0 of prunus mlp@0.270833 flap+bias+rec",
                     "llama.cpp Q4_1 of prunus mlp@0.270833 flap+bias+rec"]
    only = fr.parser().parse_args(["--only", "dense fp32,llama.cpp Q8_0 of prunus mlp@0.270833 flap+bias+rec"])
    assert fr.llama_names(only) == [("llama.cpp Q8_0 of prunus mlp@0.270833 flap+bias+rec", "Q8_0", "mlp@0.270833")]
    assert [r["name"] for r in fr.rows_wanted(only)] == ["dense fp32"]
    assert fr.llama_names(fr.parser().parse_args(["--struct-specs", "", "--llama-formats", "Q8_0"])) == [
        ("llama.cpp Q8_0", "Q8_0", None)]


def test_structured_llamacpp_row_without_its_checkpoint_is_an_error_row(tmp_path, monkeypatch):
    fr = _frontier()
    monkeypatch.setattr(fr, "LLAMA_PY", tmp_path / "python")
    (tmp_path / "python").write_text("")
    monkeypatch.setattr(fr, "_run", lambda cmd, log: (_ for _ in ()).throw(AssertionError(cmd)))
    a = fr.parser().parse_args(["--work", str(tmp_path), "--only", "llama.cpp Q4_1 of prunus mlp@0.270833 flap+bias+rec"])
    (row,) = fr.llamacpp_rows(a, print)
    assert row["name"].startswith("llama.cpp Q4_1 of") and "is missing" in row["error"]
