#!/usr/bin/env python3
"""Writes the tiny BERT-shaped ONNX model and WordPiece tokenizer used by unit tests.

Output (committed, a few KB): crates/models/tests/data/tiny-bert/{model.onnx,tokenizer.json,
expected.json}. The graph has BERT's interface (input_ids, attention_mask, token_type_ids ->
last_hidden_state [batch, sequence, 16]): token and type embeddings, a masked mean context
added to every position, then a 16x16 MatMul + bias + Tanh. `expected.json` holds, for a few
texts, the token ids and the mean-pooled, L2-normalised embeddings computed here with numpy
by an independent implementation of the same graph and of WordPiece.

The tokenizer file carries fixed padding and truncation at 128, like the real MiniLM one,
so the encoder's override is exercised.

Needs: numpy, onnx (pip install numpy onnx).
"""
import json
import pathlib
import re
import unicodedata

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = pathlib.Path(__file__).resolve().parent.parent / "crates/models/tests/data/tiny-bert"
DIM = 16
WORDS = ["the", "red", "blue", "green", "toy", "train", "car", "kitchen", "knife", "set", "wooden",
         "steel", "movie", "comedy", "drama", "story", "war", "star", "love", "night", "day"]
PIECES = ["##s", "##ing", "##ed", "##er", "a", "b", "c", "d", "e", "##a", "##b", "##c", "##d", "##e"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + WORDS + PIECES + [",", ".", "(", ")", "1", "2", "9", "##9", "##5"]
IDS = {t: i for i, t in enumerate(VOCAB)}


def wordpiece(word):
    """Greedy longest-match-first WordPiece, as BERT does."""
    out, start = [], 0
    while start < len(word):
        end, cur = len(word), None
        while start < end:
            sub = word[start:end] if start == 0 else "##" + word[start:end]
            if sub in IDS:
                cur = sub
                break
            end -= 1
        if cur is None:
            return ["[UNK]"]
        out.append(cur)
        start = end
    return out


def tokenize(text, max_len):
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words = re.findall(r"\w+|[^\w\s]", text)
    toks = [p for w in words for p in wordpiece(w)]
    toks = ["[CLS]"] + toks[: max_len - 2] + ["[SEP]"]
    return [IDS[t] for t in toks]


def build_model(rng):
    word_emb = rng.normal(0, 0.5, (len(VOCAB), DIM)).astype(np.float32)
    type_emb = rng.normal(0, 0.5, (2, DIM)).astype(np.float32)
    w = rng.normal(0, 0.4, (DIM, DIM)).astype(np.float32)
    b = rng.normal(0, 0.1, (DIM,)).astype(np.float32)
    inits = [numpy_helper.from_array(word_emb, "word_emb"), numpy_helper.from_array(type_emb, "type_emb"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
             numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_last")]
    nodes = [
        helper.make_node("Gather", ["word_emb", "input_ids"], ["e"], axis=0),
        helper.make_node("Gather", ["type_emb", "token_type_ids"], ["t"], axis=0),
        helper.make_node("Add", ["e", "t"], ["h0"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "axis_last"], ["m3"]),
        helper.make_node("Mul", ["h0", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "axis1"], ["hs"], keepdims=1),
        helper.make_node("ReduceSum", ["m3", "axis1"], ["ms"], keepdims=1),
        helper.make_node("Div", ["hs", "ms"], ["ctx"]),
        helper.make_node("Add", ["h0", "ctx"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w"], ["h2"]),
        helper.make_node("Add", ["h2", "b"], ["h3"]),
        helper.make_node("Tanh", ["h3"], ["last_hidden_state"]),
    ]
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
           for n in ["input_ids", "attention_mask", "token_type_ids"]]
    out = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", DIM])]
    graph = helper.make_graph(nodes, "tiny_bert", ins, out, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="troupe-tests")
    onnx.checker.check_model(model)
    return model, (word_emb, type_emb, w, b)


def reference(params, ids_list):
    """Independent numpy forward pass + mean pooling + L2 norm, one text at a time."""
    word_emb, type_emb, w, b = params
    out = []
    for ids in ids_list:
        h0 = word_emb[ids] + type_emb[np.zeros(len(ids), dtype=np.int64)]
        ctx = h0.mean(axis=0, keepdims=True)
        h = np.tanh((h0 + ctx) @ w + b)
        v = h.mean(axis=0)
        out.append((v / np.linalg.norm(v)).astype(np.float64).tolist())
    return out


def tokenizer_json():
    added = [{"id": IDS[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in SPECIAL]
    return {
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", IDS["[SEP]"]], "cls": ["[CLS]", IDS["[CLS]"]]},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": IDS},
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261126)
    model, params = build_model(rng)
    onnx.save(model, OUT / "model.onnx")
    (OUT / "tokenizer.json").write_text(json.dumps(tokenizer_json(), indent=1))
    texts = ["The red toy train", "Blue cars", "Kitchen knife set (steel)", "Zebra xylophone",
             "love story, 1995", "the the the the the the the the the the the the the the the the"]
    max_len = 12
    ids = [tokenize(t, max_len) for t in texts]
    expected = {"max_len": max_len, "dim": DIM,
                "cases": [{"text": t, "ids": i, "embedding": e} for t, i, e in zip(texts, ids, reference(params, ids))]}
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
