"""Where does the question's selection go? A diagnosis of a gist adapter's chunk choice.

rag_eval reports gold-chunk recall (did a selecting head unfold a chunk of a gold passage?)
against the chance level. This script says where the selections go instead: for the question's
last token, in every selecting layer and KV head, the chunks it unfolded, tallied by what they
are — template prefix (system line, user header), a passage's first chunk (its "Document [i]
(Title: ...)" header), later chunks of a passage, gold vs other passages, and the passage's
place in the prompt — each next to the share a uniform choice would give.

    python benchmarks/selection_diagnosis.py --data nq --limit 30            # the bundled 8x adapter
    python benchmarks/selection_diagnosis.py --data nq --adapter runs/sft8 --device cuda --limit 300

Prints a table and writes JSON (default benchmarks/results/selection/<set>-<adapter>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# benchmarks/ holds kernels.py: keep it off sys.path so transformers' own `kernels` import is not shadowed
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]

from transformers import DynamicCache

from gsa_rag import attention
from gsa_rag.engine import GistEngine
from gsa_rag.eval.data import load_examples
from gsa_rag.eval.harness import _recording_factory, unfolded_chunks
from gsa_rag.generation import forward


def chunk_categories(layout, b: int, gold: set[int], eligible: int) -> list[str]:
    """The category of each eligible chunk (0 .. eligible-1) of row b."""
    chunk, passage = layout.chunk_id[b], layout.passage_id[b]
    raw = layout.valid[b] & ~layout.is_gist[b] & (chunk >= 0) & (chunk < eligible)
    first_chunk: dict[int, int] = {}
    owner = [-1] * eligible
    for c, p in zip(chunk[raw].tolist(), passage[raw].tolist()):
        if owner[c] == -1 or p >= 0:
            owner[c] = p
        if p >= 0:
            first_chunk.setdefault(p, c)
    out = []
    for c, p in enumerate(owner):
        if p < 0:
            out.append("template prefix")
        else:
            where = "header chunk" if first_chunk[p] == c else "body chunk"
            out.append(f"{'gold' if p in gold else 'other'} passage, {where}")
    return out


def position_free_scoring(engine, current: dict) -> None:
    """Experiment: score gists by q . k with RoPE taken out of both (each rotated back to
    position 0), so the score no longer depends on the distance between question and chunk.
    Patches gsa_rag.selection._gist_scores (what every selection path scores through);
    `current["layout"]` names the layout being run and `current["layer"]` the layer (`tally`
    sets both; a layer not named is taken to apply RoPE). A layer without RoPE (NoPE: SmolLM3's,
    Llama 4's) keeps its plain scores: its q and k carry no position to take out."""
    from gsa_rag import selection
    from gsa_rag.cache import KeyRotator

    rotator, plain = KeyRotator(engine.model), selection._gist_scores

    def scores(query, key, gather_index, missing):
        layer = current.get("layer")
        if layer is not None and not rotator.uses_rope(layer):
            return plain(query, key, gather_index, missing)
        layout = current["layout"]
        assert layout.batch_size == 1, "the experiment runs one question at a time"
        gist_index = gather_index[:, 0, :, 0]
        q_pos = layout.position_ids[0, -query.shape[2]:]
        g_pos = layout.position_ids[0].gather(0, gist_index[0].clamp(min=0))
        q0 = rotator.rotate(query, -q_pos)
        k0 = rotator.rotate(torch.gather(key, 2, gather_index), -g_pos)
        index = torch.arange(k0.shape[2], device=key.device)[None, None, :, None].expand_as(k0)
        return plain(q0, k0, index, missing)

    selection._gist_scores = scores


@contextlib.contextmanager
def naming_layers(model, current: dict):
    """Within the block, `current["layer"]` is the index of the layer whose attention runs."""
    def name(module, args):
        current["layer"] = module.layer_idx

    handles = [m.register_forward_pre_hook(name) for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tally(engine, examples, first_layer: int, current: dict | None = None) -> dict:
    counts: dict[str, list[float]] = {}  # category -> [selected, uniform expectation]
    by_place = torch.zeros(2, 10)  # selected / uniform share by passage place 0..9
    for ex in examples:
        layout = engine.layout([ex.question], [ex.passages])
        if current is not None:
            current["layout"] = layout
        factory = _recording_factory(None)
        naming = naming_layers(engine.model, current) if current is not None else contextlib.nullcontext()
        with torch.no_grad(), naming:
            _, state = forward(engine.model, layout, layout.seq_len, DynamicCache(), engine.config,
                               state_factory=factory)
        eligible = int(layout.num_chunks[0]) - engine.config.num_previous_chunks
        if eligible <= 0:
            continue
        gold = {i for i, p in enumerate(ex.passages) if getattr(p, "is_gold", None)}
        cats = chunk_categories(layout, 0, gold, eligible)
        chunk = layout.chunk_id[0]
        T = chunk.shape[0]
        raw = layout.valid[0] & ~layout.is_gist[0] & (chunk >= 0) & (chunk < eligible)
        place = torch.full((eligible,), -1, dtype=torch.long)
        place[chunk[raw]] = layout.passage_id[0, :T][raw]
        layers = [layer for layer in sorted(state.rows) if layer >= first_layer]
        if not layers:
            continue
        unfolded = unfolded_chunks(layout, [state.rows[layer] for layer in layers], engine.config.num_previous_chunks)
        for sel in unfolded[:, 0].flatten(0, 1)[:, :eligible]:  # one (layer, KV head) at a time
            n_sel = int(sel.sum())
            if n_sel == 0:
                continue
            for c, cat in enumerate(cats):
                entry = counts.setdefault(cat, [0.0, 0.0])
                entry[0] += float(sel[c]) / n_sel
                entry[1] += 1.0 / eligible
            for p in range(10):
                in_p = place == p
                by_place[0, p] += float((sel & in_p).sum()) / n_sel
                by_place[1, p] += float(in_p.sum()) / eligible
    total = sum(v[1] for v in counts.values()) or 1.0
    shares = {k: {"selected": 100 * v[0] / total, "uniform": 100 * v[1] / total} for k, v in sorted(counts.items())}
    place_total = by_place.sum(-1, keepdim=True).clamp(min=1e-9)
    places = (100 * by_place / place_total).tolist()
    return {"categories": shares, "passage_place": {"selected": places[0], "uniform": places[1]}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="nq")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--adapter", default="default", help="adapter dir, 'default' (bundled) or 'none'")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--position-free", action="store_true",
                   help="experiment: score gists with RoPE taken out of q and k (distance-free selection)")
    args = p.parse_args(argv)
    adapter = None if args.adapter == "none" else args.adapter
    engine = GistEngine.from_pretrained(adapter=adapter, device=args.device)
    examples = load_examples(args.data, limit=args.limit)
    current: dict = {}
    if args.position_free:
        position_free_scoring(engine, current)
        attention.SELECT_KERNEL = False  # the CUDA select kernel scores on its own, never through _gist_scores
    result = tally(engine, examples, engine.config.first_selecting_layer, current)
    name = Path(adapter).name if adapter and adapter != "default" else ("default" if adapter else "untrained")
    name += "-position-free" if args.position_free else ""
    result["run"] = {"data": args.data, "n": len(examples), "adapter": name, "gist_config": engine.config.__dict__
                     if not hasattr(engine.config, "to_dict") else engine.config.to_dict()}
    print(f"where the question's selections go — {args.data}, {len(examples)} questions, adapter {name}\n")
    print("| chunk kind | share of selections (%) | uniform choice (%) |\n|---|---|---|")
    for cat, v in result["categories"].items():
        print(f"| {cat} | {v['selected']:.1f} | {v['uniform']:.1f} |")
    print("\n| passage place | " + " | ".join(str(i + 1) for i in range(10)) + " |\n|---|" + "---|" * 10)
    for key in ("selected", "uniform"):
        print(f"| {key} (%) | " + " | ".join(f"{x:.1f}" for x in result["passage_place"][key]) + " |")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / "selection" / f"{args.data}-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
