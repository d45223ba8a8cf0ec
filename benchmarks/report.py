"""Markdown table of `gsa-rag eval` result files (the README's results section is made with this).

    python benchmarks/report.py benchmarks/results/*.json
"""

import json
import sys
from pathlib import Path


def row(path: Path) -> str:
    s = json.loads(path.read_text())["summary"]
    g = s["gist_config"]
    method = f"GSA {g['chunk_size']}x, top-{g['top_k']} ({g['k_policy']})" if g["chunk_size"] else "full attention (no gists)"
    lo, hi = s["subspan_em_ci95"]
    return (f"| {Path(s['data']).stem} ({s['split']}, first {s['n']}) | {method} | {s['subspan_em']:.1f} [{lo:.1f}, {hi:.1f}] "
            f"| {s['f1']:.1f} | {s['attended_keys']:.0f} | {s['device_name']} | `{path.name}` |")


def main(paths: list[str]) -> None:
    print("| set | method | best-subspan EM [95% CI] | F1 | keys attended at the question | device | file |")
    print("|---|---|---|---|---|---|---|")
    for p in paths:
        print(row(Path(p)))


if __name__ == "__main__":
    main(sys.argv[1:])
