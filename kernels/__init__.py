"""Fast paths for the hot loops (installed as gsa_rag.kernels).

Each kernel sits beside its torch reference; tests/test_kernels.py compares them.

    gist_select    one decode step's key list per (batch, KV head): gist scores (Triton),
                   top-k / top-p + GQA union, list expansion (Triton); DecodePlan is built
                   once per step from gsa_rag.masks.visible, so the list is the engine's rule
    row_search     the select kernels' threshold searches over one score row (Triton helpers: bisection,
                   interpolation on a normal fit, the tie rule)
    window_select  top-k per query head among the candidates of a window placed from a sample of the
                   row, rows split over programs (where the search kernel would stream few long rows)
    gist_keys8     the int8 copy of the gist keys that scoring reads under GistConfig(score_dtype="int8")
                   (per-channel scales folded into the query)
    hier_select    the same for H-GSA layouts: coarse-to-fine selection that scores only the
                   top level and the children of what was chosen (scores and top-k kernels of
                   gist_select, one unfold kernel per level), HierPlan beside DecodePlan
    sparse_decode  split-K flash-decode over that list, GQA-shared K/V loads (Triton)
    masked_rows    split-K attention of a few query rows (a question over gist memory) under a
                   dense per-KV-head mask, GQA-shared K/V loads (Triton; gsa_rag.attention.ROWS_KERNEL)
    prefill        prefill under the forgetting mask through FlexAttention, recall columns
                   permuted to the front so the BlockMask is sparse; `masked_prefill` serves the
                   engine's long prefills under the mask it already holds (gsa_rag.attention.FLEX_PREFILL)
    pdl            programmatic dependent launch (Hopper and later) for the decode step's kernels:
                   each waits on the device for the one before instead of behind its launch
    dispatch       which path runs (GSA_RAG_KERNELS: auto / 0 / 1); imports no Triton
    bench          helpers of the kernel benchmarks (synthetic layouts, timing)

Triton is optional: the references need only torch, and nothing here imports Triton unless a
kernel is asked for.
"""
