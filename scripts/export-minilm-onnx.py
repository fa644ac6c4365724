"""ONNX Runtime's outputs of MiniLM's exported encoder on 8 sentences (see
scripts/export-minilm-onnx).

argv: MODEL_DIR (tokenizer.json) OUT_DIR (holding model.onnx)

Writes, in OUT_DIR, the tokenised batch (padded to the longest sentence) as INT64 files and
ONNX Runtime's last_hidden_state, with manifest.json in the format of scripts/make-onnx.py's
graph entries.
"""

import json
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quiver batches requests by deadline.",
    "A QUIC stream carries one inference request.",
    "Gradient-boosted trees score card transactions for fraud.",
    "Hello!",
    "ONNX graphs run on candle-onnx, on the CPU and on CUDA.",
    "The batcher fills the dynamic first dimension.",
    "Sentence embeddings are mean-pooled and normalised.",
]


def main():
    src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    enc = tok.encode_batch(SENTENCES)
    n = max(len(e.ids) for e in enc)
    ids = np.zeros((len(enc), n), np.int64)
    mask = np.zeros((len(enc), n), np.int64)
    types = np.zeros((len(enc), n), np.int64)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
        types[i, : len(e.ids)] = e.type_ids
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, feeds)
    entry = {"model": "model.onnx", "inputs": [], "outputs": []}
    for key, value in feeds.items():
        f = f"in.{key}.bin"
        value.astype("<i8").tofile(out / f)
        entry["inputs"].append({"name": key, "datatype": "INT64", "shape": list(value.shape), "file": f})
    for key, value in zip(names, results):
        f = f"out.{key}.bin"
        value.astype("<f4").tofile(out / f)
        entry["outputs"].append({"name": key, "datatype": "FP32", "shape": list(value.shape), "file": f})
    for key, file in [("ops", "model.onnx"), ("default_opset_ops", "model.default-opset.onnx")]:
        m = onnx.load(str(out / file))
        entry[key] = sorted({n.op_type for n in m.graph.node})
        entry[key.replace("ops", "opset")] = [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")][0]
    entry["onnxruntime"] = ort.__version__
    (out / "manifest.json").write_text(json.dumps(entry, indent=2) + "\n")


if __name__ == "__main__":
    main()
