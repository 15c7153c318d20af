"""Time a compiled ONNX artifact folder that is not a bundle, exactly as `edgeforge bench` times a bundle.

    python bench/artifact_bench.py OUT/x86 -p 512 -n 128 -r 1 --json     # OUT/x86: `edgeforge compile` -o

For models whose bundle the golden gate refuses (a random 8B amplifies int8-activation rounding past
any tolerance a smoke test could hold, docs/notes/onnx.md Session 14), so their speed can still be
compared with the peers' on the same weights. Nothing vouches for such an artifact's outputs: its rows
say "artifact, no golden data" (bench/scale.py peers --artifact), never a bundle's name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path, help="a folder with artifact.json (edgeforge compile -o)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from edgeforge.runtime.bundle_errors import Failure

    try:
        return _time(args)
    except Failure as err:  # a wrong folder or a machine that cannot run it: one line, its exit code
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def _time(args) -> int:
    from edgeforge.bundle.bench import run_bench
    from edgeforge.runtime.bundle_errors import BundleError
    from edgeforge.runtime.onnx_engine import OnnxEngine

    path = args.artifact / "artifact.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: not an `edgeforge compile` folder ({err.strerror if isinstance(err, OSError) else err})")
    if not isinstance(info, dict) or info.get("backend") != "onnx":
        raise BundleError(f"{path}: backend {info.get('backend') if isinstance(info, dict) else info!r}; "
                          "only ONNX artifacts are timed here")
    engine = OnnxEngine(args.artifact, max_length=max(args.n_prompt, args.n_gen + 1))
    manifest = {"name": f"{args.artifact.name} (artifact, no golden data)", "backend": "onnx",
                "target": {"name": str(info.get("target", "?"))}, "scheme": info.get("scheme"),
                "config": {"vocab_size": engine.vocab_size}}
    records = run_bench(engine, manifest, args.n_prompt, args.n_gen, args.repetitions)
    if args.json:
        print(json.dumps(records))
    else:
        for r in records:
            print(f"{r['test']:>8} {r['avg_ts']:10.2f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
