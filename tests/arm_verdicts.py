"""The smoke verdicts of compiled ONNX artifacts in *this* interpreter (the arm64 root's Python under
qemu): a helper tests/fidelity.py starts in a subprocess.

    python arm_verdicts.py CASES.json

CASES.json: [{"artifact": DIR, "golden": FILE, "rel": float}, ...]. `edgeforge_runtime` (a copy of
edgeforge/runtime, as in a bundle) must be importable. Prints one JSON line: for each case, the
list of golden_check.run_prompt results of its prompts.
"""

import json
import sys

from edgeforge_runtime.golden_check import run_prompt
from edgeforge_runtime.onnx_engine import OnnxEngine


def main():
    out = []
    for case in json.load(open(sys.argv[1])):
        engine = OnnxEngine(case["artifact"], threads=1)
        golden = json.load(open(case["golden"]))
        out.append([run_prompt(engine, p, case["rel"]) for p in golden["prompts"]])
        del engine
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
