"""The quality-speed front at a glance: mean KL against decode tok/s for every edgeforge scheme and
every llama.cpp file that has both numbers (issue 13).

    python bench/chart.py --speed bench/results/schemes-speed.json \
        --quality bench/results/quality-plausible.json -o bench/results/kl-vs-speed.png

KL comes from bench/quality.py's result (one scorer for every row, on the plausible-float SmolLM2;
the first text); decode speed from a bench/run.py result (tg128 median at the given thread count).
llama.cpp's "+ imatrix" files are the same type as their plain ones, so they share its speed. Rows
without a KL (ORT GenAI: its builder starts from an HF folder, not from the plausible floats) are
left out and listed on stderr. Needs matplotlib (bench only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def points(speed: dict, quality: dict, threads: int, text: str | None = None) -> tuple[list[dict], list[str]]:
    """[{label, family, backend, kl, tg_ts, bytes}] and the speed rows left out (no KL)."""
    text = text or next(iter(quality["texts"]))
    kl = {r["scheme"]: r["kl"] for r in quality["texts"][text]["rows"] if r["scheme"] != "float"}
    sizes = quality.get("bytes", {})
    out, missing = [], []
    for row in speed["speed"]:
        if row["threads"] != threads or not row.get("tg_ts"):
            continue
        engine = row["engine"]
        if engine.startswith("edgeforge "):
            _, backend, scheme = engine.split(" ", 2)
            keys = [(scheme, f"edgeforge {scheme} ({backend})")]
            family = f"edgeforge {backend}"
        elif engine.startswith("llama.cpp "):
            keys = [(k, k) for k in kl if k == engine or k.startswith(engine + " + ")]
            family = "llama.cpp"
        else:
            keys, family = [], engine.split(" ")[0]
        if not keys:
            missing.append(engine)
        for key, label in keys:
            if key in kl:
                out.append({"label": label, "family": family, "kl": kl[key], "tg_ts": row["tg_ts"],
                            "bytes": sizes.get(key)})
            else:
                missing.append(engine)
    return out, sorted(set(missing))


def draw(pts: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"edgeforge onnx": "tab:blue", "edgeforge tvm": "tab:cyan", "llama.cpp": "tab:red"}
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for family in sorted({p["family"] for p in pts}):
        sub = [p for p in pts if p["family"] == family]
        ax.scatter([p["tg_ts"] for p in sub], [p["kl"] for p in sub], label=family, s=40,
                   color=colors.get(family, "tab:gray"))
        for p in sub:
            name = p["label"].replace("edgeforge ", "").replace(" (onnx)", "").replace(" (tvm)", "")
            ax.annotate(name, (p["tg_ts"], p["kl"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("decode tok/s (tg128, median; higher is better)")
    ax.set_ylabel("mean KL vs float, nats/token (log; lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", type=Path, default=RESULTS / "schemes-speed.json")
    ap.add_argument("--quality", type=Path, default=RESULTS / "quality-plausible.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--out", type=Path, default=RESULTS / "kl-vs-speed.png")
    args = ap.parse_args(argv)
    speed, quality = json.loads(args.speed.read_text()), json.loads(args.quality.read_text())
    pts, missing = points(speed, quality, args.threads)
    if not pts:
        print("error: no engine has both a KL and a decode speed", file=sys.stderr)
        return 2
    cpu = (speed.get("machine") or {}).get("cpu", "")
    draw(pts, args.out, f"SmolLM2-135M (plausible floats): quality vs decode speed, {args.threads} threads\n{cpu}")
    if missing:
        print(f"left out (no KL on the plausible floats): {', '.join(missing)}", file=sys.stderr)
    print(f"wrote {args.out} ({len(pts)} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
