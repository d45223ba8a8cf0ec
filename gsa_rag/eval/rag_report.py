"""Rendering a benchmarks/rag_eval.py results file: a markdown table and two PNG plots.

The README's benchmark section is made with `python benchmarks/report.py <files>`, which calls
`markdown_table`; nothing in it is typed by hand.
"""

from __future__ import annotations

from pathlib import Path


def _num(value, fmt: str = ".1f", none: str = "–") -> str:
    return none if value is None else format(value, fmt)


def title(result: dict) -> str:
    """One line saying what was run, on what."""
    run, env = result["run"], result["environment"]
    if run.get("adapters"):
        adapter = "per row (" + ", ".join(run["adapters"]) + ")"
    else:
        adapter = Path(run["adapter"]).name if run.get("adapter") else "none (untrained gists)"
    return (f"**{run['data_tag']}** ({run['split']}, {run['n']} questions) · model {run['model']} · adapter {adapter} · "
            f"{env['device_name']}, {run['dtype']} · greedy, {run['max_new_tokens']} new tokens · "
            f"batch {run['batch_size']} · seed {run['seed']}")


def merge_runs(results: list[dict]) -> dict:
    """One result from several runs over the same questions (e.g. one run per adapter: the
    baselines on the untrained model, gist rows with their gist adapter).

    Each method keeps its run's adapter (`method["adapter"]`); when the runs' adapters differ,
    labels name it ("full attention · full-sft"). Refuses runs over different questions.
    """
    if len(results) == 1:
        return results[0]
    first = results[0]["run"]
    for r in results[1:]:
        run = r["run"]
        if (run["data_tag"], run["split"], run["n"], run.get("ids_sha")) != \
                (first["data_tag"], first["split"], first["n"], first.get("ids_sha")):
            raise ValueError(f"cannot merge runs over different questions: {first['data_tag']} ({first['n']}) "
                             f"and {run['data_tag']} ({run['n']})")
    adapters = {_adapter_name(r["run"]) for r in results}
    # what tells the runs apart goes into every label ("full attention · full-sft"), so rows of
    # one method from different runs never collide
    varying = [(field, tag) for field, tag in _RUN_TAGS if len({tag(r["run"]) for r in results}) > 1]
    methods, seen = [], set()
    for r in results:
        suffix = " · ".join(tag(r["run"]) for _, tag in varying)
        for m in r["methods"]:
            label = f"{m['label']} · {suffix}" if suffix else m["label"]
            if label in seen:
                raise ValueError(f"cannot merge: {label!r} comes from two runs with the same settings")
            seen.add(label)
            methods.append({**m, "label": label, "adapter": _adapter_name(r["run"]), "batch_size": r["run"]["batch_size"]})
    merged = {**results[0], "methods": methods}
    merged["run"] = {**first, "batch_size": "/".join(sorted({str(r["run"]["batch_size"]) for r in results}))}
    for field, _ in varying:
        if field != "adapter":  # the title names every run's value
            merged["run"][field] = "/".join(sorted({str(r["run"][field]) for r in results}))
    if len(adapters) > 1:
        merged["run"].update(adapter=None, adapters=sorted(adapters))
    return merged


def _adapter_name(run: dict) -> str:
    return Path(run["adapter"]).name if run.get("adapter") else "untrained"


_RUN_TAGS = (  # (run field, how a label names it)
    ("model", lambda run: Path(str(run["model"])).name),
    ("adapter", _adapter_name),
    ("dtype", lambda run: str(run["dtype"])),
    ("max_new_tokens", lambda run: f"{run['max_new_tokens']} new tokens"),
    ("seed", lambda run: f"seed {run['seed']}"),
)


def summary_table(merged: list[dict]) -> str:
    """Best-subspan EM of every method (rows) on every set (columns), from merged results."""
    sets = [f"{r['run']['data_tag']} ({r['run']['n']})" for r in merged]
    rows: dict[str, list[str]] = {}
    for i, r in enumerate(merged):
        for m in r["methods"]:
            cells = rows.setdefault(m["label"], ["–"] * len(merged))
            cells[i] = _num(m["summary"]["subspan_em"])
    lines = ["| method | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows.items()]
    return "\n".join(lines)


def markdown_table(result: dict, file_name: str | None = None) -> str:
    """The results of every method of one run as a markdown table (title line first).

    Columns: best-subspan EM with its bootstrap 95% CI, EM, token F1; keys the question's last
    token attends (mean over layers and heads) and prompt tokens; gold passage: for selecting
    methods the share of (layer, KV head) selections that unfolded a gold chunk, with the chance
    level; for vector retrieval the share of questions whose gold passage was retrieved; TTFT
    and time per output token (per batch); peak memory.
    """
    methods = result["methods"]
    with_gold_subset = any("subspan_em_with_gold" in m["summary"] for m in methods)
    head = ["method", "best-subspan EM [95% CI]", "EM", "F1", "keys at question", "prompt tokens", "gold passage",
            "TTFT ms", "ms / token", "peak MB"]
    if with_gold_subset:
        head.insert(2, "EM, questions with gold")
    lines = [title(result) + (f" · `{file_name}`" if file_name else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        s = m["summary"]
        lo, hi = s["subspan_em_ci95"]
        cells = [
            m["label"],
            f"{_num(s['subspan_em'])} [{_num(lo)}, {_num(hi)}]",
            _num(s["em"]),
            _num(s["f1"]),
            _num(s["attended_question"], ".0f"),
            _num(s["prompt_tokens"], ".0f"),
            _gold_cell(s),
            _num(None if s.get("ttft_s") is None else 1000 * s["ttft_s"], ".0f"),
            _num(None if s.get("tpot_s") is None else 1000 * s["tpot_s"], ".1f"),
            _num(s.get("peak_memory_mb"), ".0f"),
        ]
        if with_gold_subset:
            cells.insert(2, f"{_num(s.get('subspan_em_with_gold'))} (n={s.get('n_with_gold', '–')})")
        lines.append("| " + " | ".join(cells) + " |")
    kinds = {m["summary"].get("memory_kind") for m in methods} - {None}
    note = (f"Peak memory: {', '.join(sorted(kinds))}. TTFT and ms/token are per batch of "
            f"{result['run']['batch_size']}; keys at the question are a mean over all layers and heads.")
    lines += ["", note]
    for m in methods:  # KV reuse: answered one question at a time, over a memory shared by the run
        s = m["summary"]
        if "passages_encoded" in s:
            lines.append(f"{m['label']}: batches of {s['batch_size']}; the gist memory encoded {s['passages_encoded']} "
                         f"passages for {s['passages_used']} uses ({s['passages_unique']} distinct) in "
                         f"{s['encode_seconds']:.1f} s (inside TTFT).")
    return "\n".join(lines)


def _gold_cell(s: dict) -> str:
    if "gold_recall" in s:
        return f"unfolded {s['gold_recall']:.0f}% (chance {s['gold_chance']:.0f}%)"
    if "gold_retrieved" in s:
        return f"retrieved {s['gold_retrieved']:.0f}%"
    return "–"


# --------------------------------------------------------------------------------------------
# plots

_COLORS = {"closed-book": "#7f7f7f", "full": "#000000", "vector": "#1f77b4", "gist-only": "#ff7f0e",
           "quest": "#2ca02c", "gsa": "#d62728"}


def _family(m: dict) -> str:
    fam = m.get("family") or m["name"]
    if fam == "vector" and m["options"].get("source") == "corpus":
        return "vector (corpus)"
    if fam == "gsa":
        kinds = [m["options"]["policy"]] if m["options"].get("policy", "fixed") != "fixed" else []
        kinds += ["KV reuse"] if m["options"].get("reuse") else []
        return f"gsa ({', '.join(kinds)})" if kinds else fam
    return fam


def plot_budget(result: dict, path: str | Path) -> Path:
    """EM (with 95% CI) against the keys the question attends, one point per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, m in enumerate(result["methods"]):
        s = m["summary"]
        x, y = s["attended_question"], s["subspan_em"]
        if x is None or y is None:
            continue
        lo, hi = s["subspan_em_ci95"]
        color = _COLORS.get(m.get("family") or m["name"], "#9467bd")
        marker = "s" if _family(m).endswith("(corpus)") else "o"
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt=marker, color=color, capsize=3)
        # alternate above / below so that neighbours' labels do not overprint
        ax.annotate(m["label"], (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 == 0 else -11), fontsize=7)
    ax.set_xscale("log")
    ax.margins(x=0.3)  # room for the labels
    ax.set_xlabel("keys attended by the question's last token (mean over layers and heads, log scale)")
    ax.set_ylabel("best-subspan EM (%)")
    ax.set_title(_plot_title(result, "EM vs attended-token budget"), fontsize=9)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_compression(result: dict, path: str | Path) -> Path:
    """EM (with 95% CI) against the nominal compression ratio (chunk size; full attention = 1),
    one line per method family."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    families: dict[str, list[tuple[float, float, float, float]]] = {}
    for m in result["methods"]:
        ratio, s = m.get("compression_ratio"), m["summary"]
        if ratio is None or s["subspan_em"] is None:
            continue
        lo, hi = s["subspan_em_ci95"]
        families.setdefault(_family(m), []).append((ratio, s["subspan_em"], lo, hi))
    full = families.pop("full", [])
    for fam, points in sorted(families.items()):
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        err = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
        base = fam.split(" ")[0]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=fam, color=_COLORS.get(base),
                    linestyle="--" if "(" in fam else "-")
    for ratio, y, lo, hi in full:
        ax.axhline(y, color="black", linewidth=1, label="full attention (1x)")
        ax.axhspan(lo, hi, color="black", alpha=0.07)
    if not families and not full:
        ax.text(0.5, 0.5, "no method of this run compresses the context", ha="center", transform=ax.transAxes)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression ratio (raw tokens per gist / chunk)")
    ax.set_ylabel("best-subspan EM (%)")
    ax.set_title(_plot_title(result, "EM vs compression ratio"), fontsize=9)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_title(result: dict, what: str) -> str:
    run = result["run"]
    adapter = "per row" if run.get("adapters") else _adapter_name(run)
    return f"{what} — {run['data_tag']} {run['split']} (n={run['n']}), {run['model']}, adapter: {adapter}"


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install -e '.[bench]' (or pass --no-plots)") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
