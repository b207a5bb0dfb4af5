"""``prunus prune --activation-sparsity`` end to end on a tiny Llama: rows, checkpoint, load, eval, export,
and every bad input refused before any work."""

import json

import pytest
import torch

from prunus.activation import ACT_KEY, Gate, calibrate_activations, gates_metadata, gates_of
from prunus.cli import main

from test_cli import run, tree_hash

FAST = ["--nsamples", "4", "--seqlen", "32", "--windows", "4", "--quiet"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_activation_only_prune_save_load_eval(tmp_path, capsys, tiny_llama_dir, text_files, one_thread):
    import prunus

    calib, ev = text_files
    before = tree_hash(tiny_llama_dir)
    out, js = tmp_path / "out", tmp_path / "r.json"
    code, stdout, err = run(capsys, "prune", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0",
                            "--activation-sparsity", "0.3", "--calib", calib, "--eval", ev, "--out", out,
                            "--json", js, *FAST)
    assert code == 0, err
    assert "act sparsity" in stdout and "magnitude+teal" in stdout and "magnitude+uniform" in stdout
    assert "baselines are the dense model: skipped" in err
    r = json.loads(js.read_text())
    assert [row["label"] for row in r["runs"]] == ["dense", "magnitude+teal", "magnitude+uniform"]
    assert [row["role"] for row in r["runs"]] == ["dense", "method", "baseline"]
    act = r["activation"]
    assert act["method"] == "teal" and act["target"] == 0.3 and act["dense_layers"] == {}
    assert 0.2 < act["achieved"] < 0.4 and set(act["per_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"}
    assert len(act["per_layer"]) == 14 and r["sparsity"] == 0.0
    assert set(r["baselines"]) == {"dense", "magnitude+uniform"}
    assert r["runs"][2]["activation"]["method"] == "uniform"
    assert tree_hash(tiny_llama_dir) == before

    meta = prunus.export.read_metadata(out)
    assert meta[ACT_KEY]["method"] == "teal" and len(meta[ACT_KEY]["layers"]) == 14
    model = prunus.load(out)
    gates = gates_of(model)
    assert len(gates) == 14 and all(isinstance(g, Gate) for g in gates.values())
    plain = prunus.load(out, activation=False)
    assert not gates_of(plain)
    ids = torch.randint(0, 300, (1, 16))
    assert not torch.allclose(_logits(model, ids), _logits(plain, ids))

    code, stdout, err = run(capsys, "eval", out, "--text", ev, "--seqlen", "32", "--windows", "4", "--quiet",
                            "--json", tmp_path / "e.json")
    assert code == 0, err
    assert "activation sparsity" in stdout
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["perplexity"] == pytest.approx(r["perplexity"], rel=1e-5)  # the gates are on, as in prune
    assert e["activation_sparsity"]["achieved"] == pytest.approx(act["achieved"], abs=1e-6)


def test_weights_then_activation_thresholds_see_the_final_weights(tmp_path, capsys, tiny_llama_dir, text_files,
                                                                   tiny_tokenizer, one_thread):
    import prunus
    from prunus.core.targets import select
    from prunus.io.data import calibration_windows, resolve_text, tokenize

    calib, ev = text_files
    out, js = tmp_path / "q24", tmp_path / "r.json"
    code, stdout, err = run(capsys, "prune", tiny_llama_dir, "--method", "magnitude", "--sparsity", "2:4+int8",
                            "--activation-sparsity", "25%", "--activation-method", "wina", "--calib", calib,
                            "--eval", ev, "--out", out, "--json", js, "activation.options.step=0.1", *FAST)
    assert code == 0, err
    r = json.loads(js.read_text())
    assert [row["label"] for row in r["runs"]] == ["dense", "magnitude", "magnitude+wina", "magnitude+uniform",
                                                   "random"]
    assert [row["role"] for row in r["runs"]][:4] == ["dense", "weights-only", "method", "baseline"]
    assert r["spec"] == "2:4+int8" and r["sparsity"] == pytest.approx(0.5)
    assert r["runs"][2]["perplexity"] == r["perplexity"] and "magnitude" in r["baselines"]
    stored = prunus.export.read_metadata(out)[ACT_KEY]
    assert stored["target"] == 0.25 and {v["scale"] for v in stored["layers"].values()} == {"colnorm"}

    # the same windows on the saved (pruned, int8) weights give the same thresholds: calibrated after pruning
    model = prunus.load(out, activation=False)
    windows = calibration_windows(tokenize(resolve_text(str(calib)), tiny_tokenizer), 4, 32, 0)
    again = calibrate_activations(model, windows, select(model), 0.25, "wina", {"step": 0.1}, progress=False)
    for name, g in again.gates.items():
        assert stored["layers"][name]["threshold"] == pytest.approx(g.threshold, rel=1e-5, abs=1e-7), name
    dense = prunus.load(tiny_llama_dir)
    before = calibrate_activations(dense, windows, select(dense), 0.25, "wina", {"step": 0.1}, progress=False)
    assert any(abs(before.gates[n].threshold - g.threshold) > 1e-4 for n, g in again.gates.items())


def test_recipe_key_and_overrides(tmp_path, capsys, tiny_llama_dir, text_files, one_thread):
    calib, ev = text_files
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_llama_dir}\nmethod: magnitude\nsparsity: 0.5\ncalib: {calib}\n"
                      f"eval: {ev}\nactivation: {{sparsity: 0.2, method: teal}}\nbaselines: [dense]\n")
    js = tmp_path / "r.json"
    code, _, err = run(capsys, "prune", "--recipe", recipe, "activation.method=uniform", "activation.sparsity=0.35",
                       "--json", js, *FAST)
    assert code == 0, err
    r = json.loads(js.read_text())
    assert [row["label"] for row in r["runs"]] == ["dense", "magnitude+uniform"]  # no weights-only, no uniform twice
    assert r["activation"]["target"] == 0.35 and r["settings"]["activation"] == {"method": "uniform", "sparsity": 0.35}


@pytest.mark.parametrize("args, message", [
    (["--activation-sparsity", "1"], "invalid activation sparsity '1'"),
    (["--activation-sparsity", "1.5"], "invalid activation sparsity"),
    (["--activation-sparsity", "-0.1"], "invalid activation sparsity"),
    (["--activation-sparsity", "100%"], "invalid activation sparsity"),
    (["--activation-sparsity", "abc"], "invalid activation sparsity"),
    (["--activation-sparsity", "0.3", "--activation-method", "nope"], "unknown activation method 'nope'"),
    (["--activation-method", "wina"], "--activation-method needs --activation-sparsity"),
    (["--activation-sparsity", "0.3", "activation.options.step=0"], "step must be greater than 0"),
    (["--activation-sparsity", "0.3", "activation.options.bins=x"], "option bins='x' is not an integer"),
    (["--activation-sparsity", "0.3", "activation.options.nope=1"], "unknown option"),
    (["--activation-sparsity", "0.3", "activation.level=1"], "activation: unknown key"),
])
def test_bad_activation_input_is_one_line_before_any_work(tmp_path, capsys, tiny_llama_dir, text_files, args,
                                                         message):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "prune", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0",
                            "--calib", text_files[0], "--out", out, *args, *FAST)
    assert code == 2 and err.startswith("prunus: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "loaded" not in err and not out.exists()


def test_activation_needs_calibration_text(tmp_path, capsys, tiny_llama_dir):
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0",
                       "--activation-sparsity", "0.3", *FAST)
    assert code == 2 and "--activation-sparsity needs --calib" in err and len(err.strip().splitlines()) == 1


def test_stored_thresholds_for_another_model_are_refused_naming_the_layer(tmp_path, capsys, tiny_llama, text_files):
    import prunus

    bad = {"model.layers.0.mlp.up_proj": Gate(0.1, 0.2), "model.layers.7.mlp.up_proj": Gate(0.1, 0.2)}
    prunus.save(tiny_llama, tmp_path / "wrong", metadata={ACT_KEY: gates_metadata("teal", 0.2, bad)})
    code, _, err = run(capsys, "eval", tmp_path / "wrong", "--text", text_files[1], "--seqlen", "32", "--quiet")
    assert code == 2 and "model.layers.7.mlp.up_proj" in err and len(err.strip().splitlines()) == 1
    entry = gates_metadata("teal", 0.2, {"model.layers.0.mlp.up_proj": Gate(0.1, 0.2)})
    entry["layers"]["model.layers.0.mlp.up_proj"]["threshold"] = -3
    prunus.save(tiny_llama, tmp_path / "malformed", metadata={ACT_KEY: entry})
    code, _, err = run(capsys, "eval", tmp_path / "malformed", "--text", text_files[1], "--seqlen", "32", "--quiet")
    assert code == 2 and "model.layers.0.mlp.up_proj has threshold -3" in err


def test_export_keeps_the_gates(tmp_path, capsys, tiny_llama_dir, text_files, one_thread):
    import prunus

    ck, planned = tmp_path / "ck", tmp_path / "planned"
    code, _, err = run(capsys, "prune", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.9",
                       "--activation-sparsity", "0.3", "--activation-method", "uniform", "--calib", text_files[0],
                       "--out", ck, "--no-baselines", *FAST)
    assert code == 0, err
    assert main(["export", str(ck), "--runtime", "dense", "--out", str(planned)]) == 0
    capsys.readouterr()
    assert prunus.export.read_metadata(planned)[ACT_KEY] == prunus.export.read_metadata(ck)[ACT_KEY]
    assert len(gates_of(prunus.load(planned))) == 14


def test_load_puts_the_gates_on_the_planned_kernel_modules(tmp_path, tiny_llama, one_thread):
    import prunus
    from prunus.kernels import SparseLinear
    from prunus.kernels.plans import PLAN_KEY, LayerPlan, Plan

    res = prunus.prune(tiny_llama, "0.9", method="magnitude", progress=False)
    names = list(res.masks)
    mods = dict(tiny_llama.named_modules())
    plan = Plan("cpu", "float32", 1, (1,), 1.0, tuple(
        LayerPlan(n, mods[n].out_features, mods[n].in_features, "0.9", 0.9, "torch_csr", "test") for n in names))
    gates = {n: Gate(0.05, 0.3, "colnorm" if i % 2 else "none") for i, n in enumerate(names)}
    meta = {PLAN_KEY: plan.to_dict(), **{ACT_KEY: gates_metadata("teal", 0.3, gates)}}
    prunus.save(tiny_llama, tmp_path / "ck", masks=res.masks, metadata=meta)
    model = prunus.load(tmp_path / "ck")
    loaded = dict(model.named_modules())
    assert gates_of(model) == gates
    assert all(isinstance(loaded[n], SparseLinear) and len(loaded[n]._forward_pre_hooks) == 1 for n in names)
    dense = prunus.load(tmp_path / "ck", runtime="dense")  # the same gates on nn.Linear layers
    assert gates_of(dense) == gates and not any(isinstance(m, SparseLinear) for m in dense.modules())
    ids = torch.randint(0, 300, (1, 9))
    torch.testing.assert_close(_logits(model, ids), _logits(dense, ids), rtol=1e-4, atol=1e-4)


def test_layers_that_cannot_be_gated_are_reported(tmp_path, capsys, text_files, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=1,
                               n_head=2)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    js = tmp_path / "r.json"
    code, _, err = run(capsys, "prune", d, "--method", "magnitude", "--sparsity", "0", "--activation-sparsity", "0.3",
                       "--calib", text_files[0], "--eval", text_files[1], "--json", js, *FAST)
    assert code == 0, err
    assert "note: activation sparsity: 4 layer(s) stay dense (a Conv1D is not an nn.Linear" in err
    act = json.loads(js.read_text())["activation"]
    assert len(act["dense_layers"]) == 4 and act["per_layer"] == {} and act["achieved"] is None


def test_pruning_a_gated_checkpoint_turns_its_gates_off(tmp_path, capsys, tiny_llama, tiny_tokenizer, text_files):
    import prunus

    src = tmp_path / "gated"
    prunus.save(tiny_llama, src, tokenizer=tiny_tokenizer, metadata={ACT_KEY: gates_metadata(
        "uniform", 0.9, {"model.layers.0.mlp.up_proj": Gate(100.0, 1.0)})})
    code, _, err = run(capsys, "prune", src, "--method", "magnitude", "--sparsity", "0.5", "--calib", text_files[0],
                       "--no-baselines", *FAST)
    assert code == 0, err
    assert "carries activation thresholds for 1 layers; they are off" in err


def test_list_shows_activation_methods(capsys):
    code, stdout, _ = run(capsys, "list")
    assert code == 0
    for name in ("teal", "wina", "uniform"):
        assert any(line.startswith("activation") and f" {name} " in line for line in stdout.splitlines()), name
