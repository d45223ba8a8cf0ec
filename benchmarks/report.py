"""Markdown tables of result files (the README's results section is made with this).

    python benchmarks/report.py benchmarks/results/*.json               # `gsa-rag eval` files: one table
    python benchmarks/report.py benchmarks/results/rag_eval/*.json      # rag_eval.py files: a table each
    python benchmarks/report.py --plots benchmarks/results/rag_eval/*.json   # also (re)draw their plots
    python benchmarks/report.py --summary --plots benchmarks/results/rag_eval/h200/*.json   # the README's

Both kinds may be mixed; `gsa-rag eval` rows come first, in one table. rag_eval files over the
same questions (one file per adapter or method group, as benchmarks/rag_eval_h200.sh writes them)
are merged into one table per question set; `--summary` first prints one EM table across the sets.
`--plots` draws each table's two PNGs beside its files (for runs made with --no-plots, e.g. where
matplotlib is absent): `<file>.budget.png`, or `<set>.budget.png` for a merged set.
"""

import json
import sys
from pathlib import Path

from gsa_rag.config import GistConfig
from gsa_rag.eval.rag_report import markdown_table, merge_runs, plot_budget, plot_compression, summary_table


def _method(g: GistConfig) -> str:
    if not g.uses_gists:
        return "full attention (no gists)"
    k = {"fixed": f"top-{g.top_k}", "adaptive": "adaptive k", "top_p": f"top-p {g.top_p}"}.get(g.k_policy, g.k_policy)
    if g.hierarchical:  # a level's chunk of chunks: the ratio alone would hide the levels
        sizes = ",".join(str(n) for n in (g.chunk_size, *g.meta_chunks))
        return f"H-GSA {g.compression_ratio}x ({sizes}), {k}"
    return f"GSA {g.chunk_size}x, {k}"


def row(path: Path) -> str:
    s = json.loads(path.read_text())["summary"]
    method = _method(GistConfig.from_dict(s["gist_config"]))
    lo, hi = s["subspan_em_ci95"]
    return (f"| {Path(s['data']).stem} ({s['split']}, first {s['n']}) | {method} | {s['subspan_em']:.1f} [{lo:.1f}, {hi:.1f}] "
            f"| {s['f1']:.1f} | {s['attended_keys']:.0f} | {s['device_name']} | `{path.name}` |")


def main(paths: list[str]) -> None:
    flags = {p for p in paths if p.startswith("--")}
    unknown = flags - {"--plots", "--summary"}
    if unknown:
        raise SystemExit(f"report.py: unknown option(s) {sorted(unknown)}; use --plots, --summary")
    eval_files, rag_groups = [], {}
    for p in (Path(x) for x in paths if x not in flags):
        if p.suffix != ".json":
            continue
        data = json.loads(p.read_text())
        if data.get("kind") == "rag_eval":
            run = data["run"]
            rag_groups.setdefault((run["data_tag"], run["split"], run["n"], run.get("ids_sha")), []).append((p, data))
        elif "summary" in data:
            eval_files.append(p)
    if eval_files:
        print("| set | method | best-subspan EM [95% CI] | F1 | keys attended at the question | device | file |")
        print("|---|---|---|---|---|---|---|")
        for p in eval_files:
            print(row(p))
    merged = [(files, merge_runs([d for _, d in files])) for files in rag_groups.values()]
    if "--summary" in flags and merged:
        print("Best-subspan EM (%), every method on every set:\n")
        print(summary_table([m for _, m in merged]))
    for i, (files, result) in enumerate(merged):
        if eval_files or i or "--summary" in flags:
            print()
        single = len(files) == 1
        print(markdown_table(result, ", ".join(p.name for p, _ in files)))
        if "--plots" in flags:
            stem = files[0][0].with_suffix("") if single else files[0][0].parent / result["run"]["data_tag"]
            plot_budget(result, stem.with_name(stem.name + ".budget.png"))
            plot_compression(result, stem.with_name(stem.name + ".compression.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
