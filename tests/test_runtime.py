"""prunus export --runtime auto / prunus bench / prunus.load with a kernel plan, on a tiny Llama."""

import json

import pytest
import torch

from prunus.cli import main

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_llama_dir, text_files):
    out = tmp_path_factory.mktemp("rt") / "ck"
    assert main(["prune", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.9", "--calib",
                 str(text_files[0]), "--out", str(out), "--no-baselines", *FAST]) == 0
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_auto_applies_plan_with_same_logits(tmp_path, capsys, pruned):
    import prunus
    from prunus.export import read_metadata
    from prunus.kernels import SparseLinear

    out = tmp_path / "planned"
    # a tiny margin: every layer takes a kernel, so the sparse path is what gets checked
    assert main(["export", str(pruned), "--runtime", "auto", "--out", str(out), "--margin", "1e-9",
                 "--tokens", "1,3"]) == 0
    meta = read_metadata(out)
    assert meta["kernel_plan"]["layers"]
    planned = prunus.load(out)
    assert any(isinstance(m, SparseLinear) for m in planned.modules())
    dense = prunus.load(out, runtime="dense")
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    ids = torch.randint(0, 300, (2, 7))
    torch.testing.assert_close(_logits(planned, ids), _logits(dense, ids), rtol=1e-4, atol=1e-4)


def test_export_keeps_dense_where_not_faster(tmp_path, pruned):
    import prunus
    from prunus.kernels import SparseLinear

    out = tmp_path / "never"
    assert main(["export", str(pruned), "--out", str(out), "--margin", "1000"]) == 0
    assert not any(isinstance(m, SparseLinear) for m in prunus.load(out).modules())


def test_export_refuses_checkpoint_without_masks(tmp_path, capsys, tiny_llama_dir):
    code = main(["export", str(tiny_llama_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "prunus checkpoint" in err and not (tmp_path / "o").exists()


def test_plan_mismatch_is_clear(tmp_path, pruned, tiny_tokenizer):
    from prunus.kernels import KernelError
    from prunus.kernels.plans import Plan, plan_model
    from prunus.export import load, load_masks

    from conftest import make_tiny_llama

    model = load(pruned)
    plan = plan_model(model, load_masks(pruned), [1], 1e-9)
    other = make_tiny_llama(len(tiny_tokenizer), hidden=32, inter=64)
    with pytest.raises(KernelError):
        plan.check(other)


def test_bench_runs_and_cuda_absent(tmp_path, capsys, pruned):
    js = tmp_path / "b.json"
    assert main(["bench", str(pruned), "--tokens", "1,4", "--prompt-tokens", "8", "--new-tokens", "2",
                 "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["layers"] and {"dense_ms", "sparse_ms", "speedup", "kernel"} <= set(r["layers"][0])
    assert r["end_to_end"]["decode_speedup"] > 0
    if not torch.cuda.is_available():
        code = main(["bench", str(pruned), "--device", "cuda"])
        assert code == 2 and "cuda" in capsys.readouterr().err.lower()
