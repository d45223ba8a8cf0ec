"""Per query head top-k through a window: the select kernel that spreads a score row over programs.

`gist_select._topk_union_kernel` finds each row's k-th largest score by a search whose every
probe is a block reduction over the whole row, one program a row, the row in registers up to
16K chunks and read from memory at every probe beyond. This kernel narrows the search to the
scores of a window first (about 5-10% of the row, at most CAP), and splits a row over PARTS
programs (a two-level select). It pays
where rows are long and few (256K batch 1: 20.8 against 37.7 us with the union), not where the
search holds its rows in registers: the search's cost there is its chain of dependent probes,
which a candidate list keeps (benchmarks/results/kernels/NOTES.md, round 24;
`gist_select.WINDOW_SELECT` says where it runs). The steps:

1. window: every program of a row reads the same strided sample of it and places [lo, hi) around
   the sample's share of the k-th place: a normal fit of the sample (mean, std), widened by four
   standard deviations of the sampling error, then checked against the sample's own counts;
   where the check fails (a row far from normal) the sample's exact order statistics give the
   ends. All programs of a row compute the same window: the same data through the same code;
2. part: a program counts its PART scores at or above hi and the finite ones, and appends those in
   [lo, hi) to the row's candidates;
3. resolve: the row's last program to arrive (the only one where a row is one part) finds the
   (k - above)-th largest candidate, the row's k-th largest, by `kth_interp` over at most CAP
   candidates in registers. Where the window missed the k-th place, or the candidates overflow
   CAP, it searches the whole row read from memory instead (the other kernel's streamed search):
   slower, the same picks. Exact ties straddling the k-th place (rare among float scores) are cut
   by chunk index over the row read from memory.

It writes per row a threshold t and a tie cut: the row's picks are its finite scores > t and
those == t at chunks below `cut`, the first ties by chunk index (the reference's stable argsort).
`gist_select._union_kernel` ORs each GQA group's picks from the scores and these, spread over
many programs.
"""

from __future__ import annotations

import torch

from gsa_rag.kernels.pdl import pdl_launch
from gsa_rag.kernels.sparse_decode import next_pow2, num_sms

try:
    import triton
    import triton.language as tl
    from gsa_rag.kernels.pdl import wait_for_previous
    from gsa_rag.kernels.row_search import kth_interp, kth_threshold, probit, row_stats
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

# words of the int32 counters a row takes (zeroed by the scores kernel before each select):
# programs arrived, candidates appended, scores at or above hi, finite scores
COUNTER_WORDS = 4
# scores a row's sample holds (strided over the row; the whole row where it is shorter), the
# candidates a row keeps, the scores of one part (a power of two), and the fewest a part takes
# when rows are split to fill the SMs; STREAM_TILE: scores a pass of the fallback search reads.
# Swept on the H200 (NOTES.md round 24: parts of 2K-16K, 8 or 16 warps, samples of 1K or 2K): parts
# of 8K, 8 warps and 1K samples were the fastest at 128K and 256K, batch 1 and 8
WINDOW_SAMPLE = 1024
WINDOW_CAP = 2048
# and at least this share of a row's scores: at the decode benchmark's k (3.5% of the chunks) a 1K
# sample's window holds about 5% of the row, which overflowed 2,048 at 512K (58K chunks) and sent
# every row to the whole-row search (top-k 138 against 76 us for the search kernel: NOTES.md round 24)
WINDOW_CAP_SHARE = 1 / 16
WINDOW_PART_MAX = 8192
WINDOW_PART_MIN = 1024
STREAM_TILE = 2048
# the window's half-width in standard deviations of the sample's count at the k-th place
MARGIN_SIGMAS = 4.0
# how a row was resolved (`window_select_launch(paths=)`): k == 0 or every finite score, no search;
# the candidates of the normal fit's window; of the sample's order statistics'; the whole row
PATH_ENDS, PATH_FIT, PATH_SAMPLE, PATH_ROW = 0, 1, 2, 3

if triton is not None:

    @triton.jit
    def _window(srow, C, k, SAMPLE: tl.constexpr, MARGIN: tl.constexpr):
        # [lo, hi) from a strided sample of the row, likely to hold its k-th largest score with
        # few others: the sample's k-th place is k_s = k * n_pos / C, give or take its sampling
        # error (binomial), so the ends sit MARGIN of those errors above and below it
        stride = tl.cdiv(C, SAMPLE)
        j = tl.arange(0, SAMPLE) * stride
        xs = tl.load(srow + j, mask=j < C, other=float("-inf"))
        xs = tl.where(xs == 0.0, 0.0, xs)
        n_s, s_min, s_max, s_sum, s_sq = row_stats(xs, srow, C, False, SAMPLE)
        k_s = k * 1.0 * tl.cdiv(C, stride) / C
        n_f = tl.maximum(n_s, 1) * 1.0
        m = MARGIN * tl.sqrt(k_s * tl.maximum(1.0 - k_s / n_f, 0.0)) + 2.0
        r_hi = tl.floor(k_s - m).to(tl.int32)  # the sample's scores at or above hi: about r_hi
        r_lo = tl.ceil(k_s + m).to(tl.int32)
        use_hi = (r_hi >= 1) & (r_hi < n_s)  # else no upper end (+inf)
        use_lo = r_lo < n_s  # else no lower end (-inf): every finite score below hi
        mean = s_sum / n_f
        std = tl.sqrt(tl.maximum(s_sq / n_f - mean * mean, 0.0))
        # the normal fit's score with c of the n above it, mean - std * probit(c, n) (as `kth_interp`)
        hi = tl.where(use_hi, mean - std * probit(tl.where(use_hi, r_hi, 1), n_s), float("inf"))
        lo = tl.where(use_lo, mean - std * probit(tl.where(use_lo, r_lo, 1), n_s), float("-inf"))
        c_hi, c_lo = tl.reduce(((xs >= hi).to(tl.int32), (xs >= lo).to(tl.int32)), 0, _add2)
        half = (m * 0.5).to(tl.int32)
        k_i = k_s.to(tl.int32)
        fitted = (c_hi <= tl.maximum(k_i - half, 0)) & (c_lo >= tl.minimum(k_i + half, n_s))
        if not fitted:  # far from normal: the sample's own order statistics
            if use_hi:
                hi, _, _ = kth_interp(xs, r_hi, n_s, s_min, s_max, mean, std, srow, C, False, SAMPLE)
            if use_lo:
                lo, _, _ = kth_interp(xs, r_lo, n_s, s_min, s_max, mean, std, srow, C, False, SAMPLE)
        return lo, hi, fitted

    @triton.jit
    def _add2(a1, b1, a2, b2):
        return a1 + a2, b1 + b2

    @triton.jit
    def _add3(a1, b1, c1, a2, b2, c2):
        return a1 + a2, b1 + b2, c1 + c2

    @triton.jit
    def _window_select_kernel(
        S, KROW, CNT, CAND, THR, CUT, PATH,
        Hq, C, PARTS,
        PART: tl.constexpr, SAMPLE: tl.constexpr, CAP: tl.constexpr, TILE: tl.constexpr,
        MARGIN: tl.constexpr, WORDS: tl.constexpr, STATS: tl.constexpr, PDL: tl.constexpr = False,
    ):
        # grid B * Hq * PARTS: part `pid % PARTS` of score row `pid // PARTS` (contiguous [B, Hq, C]).
        # STATS (tests, benchmarks): PATH[row] = how the row was resolved (PATH_* below)
        wait_for_previous(PDL)
        pid = tl.program_id(0)
        row = pid // PARTS
        part = pid % PARTS
        b = row // Hq
        srow = S + row.to(tl.int64) * C
        cnt = CNT + row * WORDS
        k = tl.load(KROW + b).to(tl.int32)
        c = part * PART + tl.arange(0, PART)
        x = tl.load(srow + c, mask=c < C, other=float("-inf"))  # in flight with the sample's loads
        lo, hi, fitted = _window(srow, C, k, SAMPLE, MARGIN)
        x = tl.where(x == 0.0, 0.0, x)
        finite = x > float("-inf")
        inside = finite & (x >= lo) & (x < hi)
        n_in, n_above, n_fin = tl.reduce((inside.to(tl.int32), (finite & (x >= hi)).to(tl.int32),
                                          finite.to(tl.int32)), 0, _add3)
        base = tl.atomic_add(cnt + 1, n_in)
        pos = base + tl.cumsum(inside.to(tl.int32), 0) - 1
        keep = inside & (pos < CAP)
        tl.store(CAND + row.to(tl.int64) * CAP + pos, x, mask=keep)
        tl.atomic_add(cnt + 2, n_above)
        tl.atomic_add(cnt + 3, n_fin)
        tl.debug_barrier()  # every thread's candidates are stored before the arrival is counted
        if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == PARTS - 1:
            # the whole candidate list is loaded with the counts (one round trip, not two), the
            # entries past their count masked after
            i = tl.arange(0, CAP)
            v = tl.load(CAND + row.to(tl.int64) * CAP + i, cache_modifier=".cg")
            n_cand = tl.load(cnt + 1, cache_modifier=".cg")
            above = tl.load(cnt + 2, cache_modifier=".cg")
            n = tl.load(cnt + 3, cache_modifier=".cg")
            k = tl.minimum(k, n)
            r = k - above  # the k-th largest is the r-th largest candidate, if the window holds it
            t = tl.full([], float("inf"), tl.float32)  # k == 0: no pick
            cut = tl.zeros([], tl.int32) + C
            path = tl.zeros([], tl.int32)  # PATH_ENDS
            if k == n:
                t = tl.full([], float("-inf"), tl.float32)  # every finite score
            elif k > 0:
                if (r >= 1) & (r <= n_cand) & (n_cand <= CAP):
                    path = tl.where(fitted, 1, 2)  # PATH_FIT, PATH_SAMPLE
                    v = tl.where(i < n_cand, v, float("-inf"))
                    t, cut = kth_threshold(v, srow, C, r, False, CAP, TILE)
                else:  # the window missed: the whole row, from memory
                    t, cut = kth_threshold(0.0, srow, C, k, True, TILE, TILE)
                    path = tl.zeros([], tl.int32) + 3  # PATH_ROW
            tl.store(THR + row, t)
            tl.store(CUT + row, cut)
            if STATS:
                tl.store(PATH + row, path)


def window_part(rows: int, num_chunks: int, sms: int) -> int:
    """Scores a program takes (a power of two): the whole row up to WINDOW_PART_MAX, halved down to
    WINDOW_PART_MIN while the rows' programs would still not fill half the SMs twice over."""
    part = min(next_pow2(max(1, num_chunks)), WINDOW_PART_MAX)
    while part > WINDOW_PART_MIN and rows * -(-num_chunks // part) * 2 <= sms:
        part //= 2
    return part


def window_warps(part: int) -> int:
    """Warps of a program by its part's length: 4, and 8 from parts of 2,048 scores (16 were slower
    at every part swept, NOTES.md round 24)."""
    return max(4, min(8, part // 256))


def window_select_launch(scores: torch.Tensor, k: torch.Tensor, counters: torch.Tensor, thresholds: torch.Tensor,
                         cuts: torch.Tensor, part: int | None = None, paths: torch.Tensor | None = None) -> None:
    """Per row of scores float32 [B, Hq, C] (contiguous; -inf: no chunk) the k[b] best, as
    thresholds float32 [B * Hq] and cuts int32 [B * Hq]: the picks are the finite scores > t and
    those == t at chunks below the cut. counters: int32 [B * Hq * COUNTER_WORDS], zeroed (the
    scores kernel zeroes them); part: scores a program takes (default `window_part`); paths: int32
    [B * Hq] or None, receives how each row was resolved (PATH_*: tests and benchmarks)."""
    B, Hq, C = scores.shape
    if C == 0:
        return
    if counters.numel() < B * Hq * COUNTER_WORDS:
        raise ValueError(f"counters hold {counters.numel()} words; the window select needs "
                         f"{B * Hq * COUNTER_WORDS} ({COUNTER_WORDS} a row)")
    if part is None:
        part = window_part(B * Hq, C, num_sms(scores.device))
    parts = -(-C // part)
    cap = min(max(WINDOW_CAP, next_pow2(int(C * WINDOW_CAP_SHARE))), next_pow2(C))
    cand = torch.empty(B * Hq, cap, dtype=torch.float32, device=scores.device)
    _window_select_kernel[(B * Hq * parts,)](
        scores, k, counters, cand, thresholds, cuts, cuts if paths is None else paths, Hq, C, parts,
        PART=part, SAMPLE=min(WINDOW_SAMPLE, next_pow2(C)), CAP=cap, TILE=min(STREAM_TILE, next_pow2(C)),
        MARGIN=MARGIN_SIGMAS, WORDS=COUNTER_WORDS, STATS=paths is not None,
        # plain: about one program an SM, which an early launch would place on whatever SMs the
        # scores kernel has left free (256K batch 1: the step 86.7-87.1 against 90.8-91.1 us with
        # PDL, NOTES.md round 24; as the int8 scores kernel's one wave, round 23)
        **pdl_launch(scores.device, allow=False), num_warps=window_warps(part),
    )
