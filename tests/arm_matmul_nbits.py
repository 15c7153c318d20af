"""Run the one-node MatMulNBits graphs of fidelity.matmul_nbits_models in *this* interpreter (the arm64
root's Python under qemu): FOLDER/cases.json names them, FOLDER/a.npy is the input; writes
FOLDER/out.npz with each graph's output for all rows at once (name_M5) and row by row (name_M1)."""

import json
import sys

import numpy as np
import onnxruntime as ort


def main():
    folder = sys.argv[1]
    a = np.load(f"{folder}/a.npy")
    out = {}
    for name, dtype in json.load(open(f"{folder}/cases.json")).items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(f"{folder}/{name}.onnx", options, providers=["CPUExecutionProvider"])
        x = a.astype(dtype)
        out[name + "_M5"] = session.run(None, {"A": x})[0].astype(np.float32)
        out[name + "_M1"] = np.concatenate([session.run(None, {"A": x[i:i + 1]})[0] for i in range(len(x))]).astype(np.float32)
    np.savez(f"{folder}/out.npz", **out)


if __name__ == "__main__":
    main()
