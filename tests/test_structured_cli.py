"""`prunus prune` with structured specs: rows beside the baselines, the checkpoint, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_cli import FAST, run, tree_hash


def test_structured_prune_end_to_end(tmp_path, capsys, tiny_llama_dir, text_files):
    from transformers import AutoModelForCausalLM

    calib, ev = text_files
    before = tree_hash(tiny_llama_dir)
    out, js, png = tmp_path / "out", tmp_path / "r.json", tmp_path / "p.png"
    code, stdout, err = run(capsys, "prune", tiny_llama_dir, "--method", "flap", "--sparsity", "heads@0.5+mlp@0.25",
                            "--calib", calib, "--eval", ev, "--out", out, "--format", "dense", "--json", js,
                            "--plot", png, "--compensate", *FAST)
    assert code == 0, err
    for label in ("dense", "flap+bias", "magnitude+bias", "random+bias"):
        assert label in stdout
    assert "block params removed" in stdout
    r = json.loads(js.read_text())
    s = r["runs"][1]["structure"]
    assert s["uniform"] and s["compensate"] and s["removed_fraction"] > 0.3
    assert r["runs"][1]["parameters"] < r["runs"][0]["parameters"]
    assert all(w == {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1}
               for w in s["widths"])
    assert png.stat().st_size > 1000
    assert tree_hash(tiny_llama_dir) == before
    plain = AutoModelForCausalLM.from_pretrained(out)  # uniform widths: no prunus needed
    assert plain.model.layers[0].mlp.down_proj.in_features == 96
    meta = json.loads((out / "prunus.json").read_text())
    assert "structure" in json.dumps(meta)
    code, stdout, err = run(capsys, "eval", out, "--text", ev, "--seqlen", "32", "--windows", "4", "--quiet")
    assert code == 0, err


def test_structure_then_nm_with_reconstruction(tmp_path, capsys, tiny_llama_dir, text_files):
    calib, ev = text_files
    js = tmp_path / "r.json"
    code, stdout, err = run(capsys, "prune", tiny_llama_dir, "--method", "sparsegpt", "--sparsity",
                            "blocks@1+mlp@0.25+2:4", "--structure-allocation", "global", "--reconstruct", "1",
                            "--calib", calib, "--eval", ev, "--json", js, *FAST)
    assert code == 0, err
    r = json.loads(js.read_text())
    main_row = r["runs"][1]
    assert main_row["label"] == "flap+sparsegpt+recon" and main_row["sparsity"] == pytest.approx(0.5)
    assert len(main_row["structure"]["removed_blocks"]) == 1


@pytest.mark.parametrize("argv,message", [
    (["--method", "flap", "--sparsity", "0.5"], "scores structures"),
    (["--method", "flap", "--sparsity", "mlp@0.3+2:4"], "scores structures only"),
    (["--method", "wanda", "--sparsity", "mlp@0.3", "--structure-allocation", "best"], "unknown structure allocation"),
    (["--method", "wanda", "--sparsity", "mlp@0.3", "--heads-unit", "kv"], "unknown head unit"),
    (["--method", "wanda", "--sparsity", "mlp@0.3", "--structure-method", "sparsegpt"], "unknown structure method"),
    (["--method", "wanda", "--sparsity", "mlp@1.0"], "leaves nothing"),
    (["--method", "wanda", "--sparsity", "blocks@2"], "all 2 blocks"),
    (["--method", "flap", "--sparsity", "mlp@0.3", "--structure-allocation", "cfsp", "--format", "dense"],
     "--format compressed"),
])
def test_structured_bad_input(tmp_path, tiny_llama_dir, text_files, argv, message):
    calib, ev = text_files
    r = subprocess.run([sys.executable, "-m", "prunus", "prune", str(tiny_llama_dir), *argv, "--calib", str(calib),
                        "--out", str(tmp_path / "o"), *FAST], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("prunus: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_structured_recipe(tmp_path, capsys, tiny_llama_dir, text_files):
    calib, ev = text_files
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama_dir}\nmethod: wanda-sp\nsparsity: heads@0.5\ncalib: {calib}\n"
                      f"nsamples: 4\nseqlen: 32\nbaselines: [dense]\n"
                      f"structure: {{allocation: global, heads: query, compensate: true}}\n")
    js = tmp_path / "r.json"
    code, stdout, err = run(capsys, "prune", "--recipe", recipe, "--json", js, "--quiet")
    assert code == 0, err
    s = json.loads(js.read_text())["runs"][1]["structure"]
    assert (s["method"], s["allocation"], s["heads_unit"], s["compensate"]) == ("wanda-sp", "global", "query", True)
    assert all(w["num_key_value_heads"] == 2 and w["num_attention_heads"] == 2 for w in s["widths"])
