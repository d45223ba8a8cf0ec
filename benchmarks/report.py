"""Markdown tables of result files (the README's results section is made with this).

    python benchmarks/report.py benchmarks/results/*.json               # `gsa-rag eval` files: one table
    python benchmarks/report.py benchmarks/results/rag_eval/*.json      # rag_eval.py files: a table each
    python benchmarks/report.py --plots benchmarks/results/rag_eval/*.json   # also (re)draw their plots

Both kinds may be mixed; `gsa-rag eval` rows come first, in one table. `--plots` draws a
rag_eval file's two PNGs beside it (for runs made with --no-plots, e.g. where matplotlib is absent).
"""

import json
import sys
from pathlib import Path

from gsa_rag.eval.rag_report import markdown_table, plot_budget, plot_compression


def row(path: Path) -> str:
    s = json.loads(path.read_text())["summary"]
    g = s["gist_config"]
    method = f"GSA {g['chunk_size']}x, top-{g['top_k']} ({g['k_policy']})" if g["chunk_size"] else "full attention (no gists)"
    lo, hi = s["subspan_em_ci95"]
    return (f"| {Path(s['data']).stem} ({s['split']}, first {s['n']}) | {method} | {s['subspan_em']:.1f} [{lo:.1f}, {hi:.1f}] "
            f"| {s['f1']:.1f} | {s['attended_keys']:.0f} | {s['device_name']} | `{path.name}` |")


def main(paths: list[str]) -> None:
    plots = "--plots" in paths
    paths = [p for p in paths if p != "--plots"]
    eval_files, rag_files = [], []
    for p in map(Path, paths):
        if p.suffix != ".json":
            continue
        data = json.loads(p.read_text())
        if data.get("kind") == "rag_eval":
            rag_files.append((p, data))
        elif "summary" in data:
            eval_files.append(p)
    if eval_files:
        print("| set | method | best-subspan EM [95% CI] | F1 | keys attended at the question | device | file |")
        print("|---|---|---|---|---|---|---|")
        for p in eval_files:
            print(row(p))
    for i, (p, data) in enumerate(rag_files):
        if eval_files or i:
            print()
        print(markdown_table(data, p.name))
        if plots:
            plot_budget(data, p.with_suffix(".budget.png"))
            plot_compression(data, p.with_suffix(".compression.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
