"""Peak device memory of building the forgetting mask (gsa_rag.masks.dense_gist_mask) for a batch
of prompts, single-level GSA against H-GSA, on the GPU: the mask every prefill builds once.

    python benchmarks/mask_memory.py
    git show 657c41c^:gsa_rag/masks.py > /tmp/old_masks.py
    python benchmarks/mask_memory.py --compare /tmp/old_masks.py   # against another masks.py

Synthetic layouts (gsa_rag.kernels.bench.synthetic_hier_layout: sink, chunks of 8, a 12-token
tail), batch 32 (rag_eval's batch) at about 1.6K and 3.5K columns. Prints GiB and bytes per
(query, key) pair of the batch; the mask itself is one byte a pair. With --compare the other file's
dense_gist_mask runs on the same layouts and must build the same mask.
Writes benchmarks/results/mask_memory/mask_memory.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch
from gsa_rag.kernels.bench import environment, synthetic_hier_layout, write_results

from gsa_rag import masks


def peak_bytes(build, layout) -> tuple[int, torch.Tensor]:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    mask = build(layout, 1)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, mask


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--contexts", type=int, nargs="+", default=[1600, 3500])
    p.add_argument("--compare", default=None, help="another masks.py whose dense_gist_mask to time alongside")
    p.add_argument("--out", default="benchmarks/results/mask_memory")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/mask_memory.py needs CUDA")
    builds = {"this": masks.dense_gist_mask}
    if args.compare:
        spec = importlib.util.spec_from_file_location("compared_masks", args.compare)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        builds = {"compared": other.dense_gist_mask, **builds}
    rows = []
    for context in args.contexts:
        for meta_chunks in ((), (4,)):
            layout = synthetic_hier_layout(args.batch, context, 8, meta_chunks, tail=12, device="cuda")
            pairs = layout.batch_size * layout.seq_len**2
            masks_built = []
            for name, build in builds.items():
                peak, mask = peak_bytes(build, layout)
                masks_built.append(mask)
                rows.append({"build": name, "batch": args.batch, "columns": layout.seq_len, "meta_chunks": list(meta_chunks),
                             "peak_bytes": peak, "bytes_per_pair": peak / pairs})
                print(f"{name:9s} batch {args.batch} x {layout.seq_len} columns, meta_chunks {meta_chunks}: "
                      f"{peak / 2**30:6.2f} GiB, {peak / pairs:5.1f} bytes a pair", flush=True)
            if not all(torch.equal(m, masks_built[0]) for m in masks_built):
                sys.exit("the compared dense_gist_mask builds another mask")
            del masks_built, mask, layout
    print(f"wrote {write_results(args.out, 'mask_memory', {'env': environment(), 'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
