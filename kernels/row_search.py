"""Threshold searches over one score row, the select kernels' shared Triton helpers.

A row is float32 scores of C chunks (-inf for a chunk that does not exist), held in registers as
one tile or, with STREAM, read from memory TILE scores at a time at every pass. The k best chunks
are those at or above a threshold t, plus the first ties at t by chunk index where ties straddle
the k-th place (the reference's stable argsort). `kth_largest` finds t by bisection over the bits
of its key, `kth_interp` by interpolation on a normal fit of the row (fewer block reductions on
smooth rows); `pick` applies the tie rule. -0.0 is read as +0.0 throughout (one key for a tie).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def score_tile(srow, C, start, TILE: tl.constexpr):
    # scores [start, start + TILE) of one row, -inf past C; -0.0 read as +0.0 (a tie, as in
    # the reference's sort, and one key for both)
    c = start + tl.arange(0, TILE)
    x = tl.load(srow + c, mask=c < C, other=float("-inf"))
    return tl.where(x == 0.0, 0.0, x)


@triton.jit
def row_count(s, srow, C, t, EQUAL: tl.constexpr, STREAM: tl.constexpr, TILE: tl.constexpr):
    # count(row >= t), or count(row == t) with EQUAL: one block reduction over the row held in
    # registers (s), or with STREAM one pass over it tile by tile from memory (srow; s is
    # unused), summed lane-wise first
    if STREAM:
        acc = tl.zeros([TILE], dtype=tl.int32)
        for start in range(0, C, TILE):
            x = score_tile(srow, C, start, TILE)
            acc += ((x == t) if EQUAL else (x >= t)).to(tl.int32)
        return tl.sum(acc, 0)
    else:
        return tl.sum(((s == t) if EQUAL else (s >= t)).to(tl.int32), 0)


@triton.jit
def top3_below(x, bound, below):
    # the three largest of x < bound (below), or of -x for x >= bound (not below)
    inside = (x >= bound) != below
    v = tl.where(inside, x * tl.where(below, 1.0, -1.0), float("-inf"))
    none = tl.full(v.shape, float("-inf"), tl.float32)
    return tl.reduce((v, none, none), 0, top3_combine)


@triton.jit
def row_top3(s, srow, C, bound, below, STREAM: tl.constexpr, TILE: tl.constexpr):
    # `top3_below` over the whole row: in registers, or tile by tile (merging the triples)
    if STREAM:
        a1 = tl.full([], float("-inf"), tl.float32)
        a2 = a1
        a3 = a1
        for start in range(0, C, TILE):
            b1, b2, b3 = top3_below(score_tile(srow, C, start, TILE), bound, below)
            a1, a2, a3 = top3_combine(a1, a2, a3, b1, b2, b3)
        return a1, a2, a3
    else:
        return top3_below(s, bound, below)


@triton.jit
def row_stats(s, srow, C, STREAM: tl.constexpr, TILE: tl.constexpr):
    # the finite scores' count, min, max, sum and sum of squares (max over all: -inf rows stay -inf)
    if STREAM:
        n = tl.zeros([TILE], dtype=tl.int32)
        lo = tl.full([TILE], float("inf"), tl.float32)
        hi = tl.full([TILE], float("-inf"), tl.float32)
        a = tl.zeros([TILE], dtype=tl.float32)
        q = tl.zeros([TILE], dtype=tl.float32)
        for start in range(0, C, TILE):
            x = score_tile(srow, C, start, TILE)
            finite = x > float("-inf")
            xf = tl.where(finite, x, 0.0)
            n += finite.to(tl.int32)
            lo = tl.minimum(lo, tl.where(finite, x, float("inf")))
            hi = tl.maximum(hi, x)
            a += xf
            q += xf * xf
        return tl.reduce((n, lo, hi, a, q), 0, stats_combine)
    else:
        finite = s > float("-inf")
        sf = tl.where(finite, s, 0.0)
        return tl.reduce((finite.to(tl.int32), tl.where(finite, s, float("inf")), s, sf, sf * sf), 0,
                         stats_combine)


@triton.jit
def key_float(y):
    # the float of an order-preserving 32-bit key (int64 in [0, 2^32)): key(s) = bits | 2^31
    # for s >= 0, ~bits for s < 0; keys past the finite floats give NaN (which compares false)
    u = tl.where(y >= 2147483648, y - 2147483648, 4294967295 - y)
    return u.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def kth_largest(s, k, EARLY_EXIT: tl.constexpr, srow, C, STREAM: tl.constexpr, TILE: tl.constexpr):
    # the k-th largest of the row s by bisection over the 32 bits of its key (`key_float`):
    # x = the largest key with count(s >= float(x)) >= k, one block reduction per bit.
    # EARLY_EXIT stops once count(s >= float(x)) == k: float(x) then splits the row into its k
    # best and the rest just as the k-th largest would (the caller picks s >= t with ties
    # resolved by `room`, and none straddle); with distinct scores that is after the bits
    # that separate the k-th from the (k+1)-th largest, about 20 of 32 at 16K chunks.
    # Measured on the H200 (benchmarks/results/kernels/NOTES.md): the bisection beats a radix
    # select over tl.histogram (2.4x slower) and two bits per step in packed int64 counts (1.1x slower).
    # Also returns the number of reductions it ran (the kernel's STATS output).
    x = tl.full([], 0, tl.int64)
    step = tl.full([], 2147483648, tl.int64)
    count_x = tl.full([], -1, tl.int32)  # count(s >= float(x)) once known
    steps = tl.full([], 0, tl.int32)
    while (step > 0) & ((count_x != k) | (not EARLY_EXIT)):
        y = x + step  # x's bits below `step` are all 0
        cnt = row_count(s, srow, C, key_float(y), False, STREAM, TILE)
        x = tl.where(cnt >= k, y, x)
        count_x = tl.where(cnt >= k, cnt, count_x)
        step = step // 2
        steps += 1
    # k == 0: NaN, or (early exit) a threshold above every score; no pick either way
    return key_float(x), steps


@triton.jit
def float_key(x):
    # the order-preserving key of a float32 (the inverse of `key_float`): int64 in [0, 2^32)
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits >= 0, bits + 2147483648, -1 - bits)


@triton.jit
def probit(c, n):
    # Phi^-1((c + 1/2) / (n + 1)): the standard normal quantile of "c of the n scores lie at or
    # above t" (the halves keep c = 0 and c = n finite). On a normal row it is linear in t, so
    # the search interpolates in it; Abramowitz & Stegun 26.2.23 (error < 4.5e-4, monotone
    # enough: it only places probes, never decides a pick)
    m = tl.minimum(c, n - c).to(tl.float32)
    r = tl.sqrt(-2.0 * tl.log((m + 0.5) / (n.to(tl.float32) + 1.0)))
    z = r - (2.515517 + r * (0.802853 + r * 0.010328)) / (1.0 + r * (1.432788 + r * (0.189269 + r * 0.001308)))
    return tl.where(2 * c < n, -z, z)


@triton.jit
def stats_combine(n1, lo1, hi1, a1, q1, n2, lo2, hi2, a2, q2):
    # count, min, max, sum, sum of squares in one reduction (one barrier round, not five)
    return n1 + n2, tl.minimum(lo1, lo2), tl.maximum(hi1, hi2), a1 + a2, q1 + q2


@triton.jit
def top3_combine(a1, a2, a3, b1, b2, b3):
    # the three largest of two sorted triples (equal values stay apart: ties show): the i-th of
    # the union is the largest min(a_p, b_q) over p + q = i (a_0 = b_0 = +inf)
    return (tl.maximum(a1, b1), tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2)),
            tl.maximum(tl.maximum(a3, b3), tl.maximum(tl.minimum(a1, b2), tl.minimum(a2, b1))))


@triton.jit
def kth_interp(s, k, n, s_min, s_max, mean, std, srow, C, STREAM: tl.constexpr, TILE: tl.constexpr):
    # A threshold t that splits the row s as its k-th largest does, from fewer block reductions
    # than `kth_largest` on smooth rows (0 < k <= n = the finite scores, from one reduction of
    # count, min, max, sum and sum of squares). Returns (t, exact, steps): exact = 1 when
    # count(s >= t) == k (the caller then picks s >= t), else t is the k-th largest value itself
    # and a tie straddles the k-th place (the caller's tie rule picks the lowest chunks).
    #
    # The bracket [lo, hi), as keys (`float_key`): c_lo = count(s >= lo) > k > c_hi =
    # count(s >= hi); it starts at [min, max + 1 ulp] (c_lo = n, c_hi = 0). Each step runs one
    # block reduction:
    # - a probe t inside the bracket, count(s >= t): done if == k, else t replaces an end.
    #   Where it lands: first the normal fit mean - std * probit(k) (`probit`), then regula
    #   falsi on probit(count) - probit(k) (Illinois: an end kept twice has its value halved, so
    #   the search does not creep from one side), in float space. probit(count) is linear in t
    #   on a normal row (q.k of random vectors: the decode benchmark's scores), so the far
    #   initial ends still give good probes. The probe is the bracket's midpoint in key space
    #   instead when the interpolated one is not strictly inside (NaN, overflow, rounding
    #   onto an end), after two interpolations in a row that neither halved the bracket nor
    #   halved the count gap min(c_lo - k, k - c_hi) (rows far from smooth: magnitudes spread
    #   over many octaves), and once 31 steps other than midpoints have run;
    # - after a probe that found no score between itself and the end it replaced (count ==
    #   that end's count), the end moves onto the nearest score instead (`snap`: max of the
    #   scores below hi, or min of those at or above lo): ties and outliers otherwise take
    #   one bisection per octave between the tied value and the probe;
    # - once k - c_hi <= 2 (or c_lo - k <= 2) the three largest scores below hi (the three
    #   smallest at or above lo) finish: the k-th largest and its neighbour, equal or not (the
    #   last few scores cost a probe each otherwise: about 1 reduction less on average).
    # Bound: at most 32 midpoints (each halves the key width, < 2^32 at the start), 31
    # interpolations and snaps, one finish: 64 reductions, the loop's cap (NaN scores, which
    # q.k of finite tensors never gives, stop there too, with a wrong threshold but no hang).
    # (a search that is done closes the bracket onto its threshold: hi <= lo + 1, t = lo)
    lo_k = float_key(s_min)
    exact = (n == k).to(tl.int32)  # k == n: every finite score (k == 0 never gets here)
    # s_max = +inf: hi is NaN, and count(s >= NaN) = 0 still
    hi_k = tl.where(exact != 0, lo_k, float_key(s_max)) + 1
    c_lo = n
    c_hi = tl.full([], 0, tl.int32)
    g_k = probit(k, n)
    f_lo = probit(c_lo, n) - g_k  # > 0
    f_hi = probit(c_hi, n) - g_k  # < 0
    guess = mean - std * g_k  # the normal fit's k-th largest (NaN or inf on wild rows: unused)
    side = tl.full([], 0, tl.int32)  # +1: lo moved last, -1: hi moved last
    snap = tl.full([], 0, tl.int32)  # +1 / -1: move lo / hi onto the nearest score next
    stall = tl.full([], 0, tl.int32)  # interpolations in a row without progress
    free = tl.full([], 0, tl.int32)  # interpolations and snaps so far
    steps = tl.full([], 0, tl.int32)
    while (hi_k - lo_k > 1) & (steps < 64):
        steps += 1
        lo_f = key_float(lo_k)
        hi_f = key_float(hi_k)
        finish = (k - c_hi <= 2) | (c_lo - k <= 2)
        if finish | (snap != 0):
            # the largest three below hi, or (negated) the smallest three at or above lo
            below = tl.where(finish, k - c_hi <= 2, snap < 0)
            a1, a2, a3 = row_top3(s, srow, C, tl.where(below, hi_f, lo_f), below, STREAM, TILE)
            # finish below hi: the k-th largest is a_j (j = k - c_hi); at lo: -a_(j+1) (j = c_lo - k);
            # it splits off exactly k unless a_j == a_(j+1). A snap moves an end onto a1.
            j = tl.where(below, k - c_hi, c_lo - k)
            aj = tl.where(j == 1, a1, a2)
            aj1 = tl.where(j == 1, a2, a3)
            t_k = float_key(tl.where(below, aj, -aj1))
            exact = (finish & (aj != aj1)).to(tl.int32)
            lo_k = tl.where(finish, t_k, tl.where(below, lo_k, float_key(-a1)))
            hi_k = tl.where(finish, t_k + 1, tl.where(below, float_key(a1) + 1, hi_k))
            free += (finish == 0).to(tl.int32)
            snap = tl.full([], 0, tl.int32)
        else:
            w = f_lo / (f_lo - f_hi)
            cand = lo_f + (hi_f - lo_f) * w
            g_in = (guess == guess) & (float_key(guess) > lo_k) & (float_key(guess) < hi_k)
            cand = tl.where((steps == 1) & g_in, guess, cand)  # the first probe: the normal fit
            tk = float_key(cand)
            interp = (cand == cand) & (tk > lo_k) & (tk < hi_k) & (stall < 2) & (free < 31)
            tk = tl.where(interp, tk, (lo_k + hi_k) // 2)
            c = row_count(s, srow, C, key_float(tk), False, STREAM, TILE)
            exact = (c == k).to(tl.int32)
            width = hi_k - lo_k
            gap = tl.minimum(c_lo - k, k - c_hi)
            up = c > k
            empty = interp & tl.where(up, c == c_lo, c == c_hi)
            f_c = probit(c, n) - g_k
            # Illinois: the end kept a second time in a row weighs half
            f_hi = tl.where(up & (side > 0), f_hi * 0.5, f_hi)
            f_lo = tl.where((up == 0) & (side < 0), f_lo * 0.5, f_lo)
            lo_k = tl.where(c >= k, tk, lo_k)
            c_lo = tl.where(up, c, c_lo)
            f_lo = tl.where(up, f_c, f_lo)
            hi_k = tl.where(up, hi_k, tk)  # c == k: lo = hi = tk, done
            c_hi = tl.where(up, c_hi, c)
            f_hi = tl.where(up, f_hi, f_c)
            side = tl.where(up, 1, -1)
            free += interp.to(tl.int32)
            snap = tl.where(empty & (free < 31), side, 0)
            progress = ((hi_k - lo_k) * 2 <= width) | (tl.minimum(c_lo - k, k - c_hi) * 2 <= gap)
            stall = tl.where(interp & (progress == 0), stall + 1, 0)
    # not exact: lo and hi are adjacent keys, so lo is the k-th largest (a tie straddles it)
    return key_float(lo_k), exact, steps


@triton.jit
def pick_top(x, t, exact, room, ties, seen):
    # the picks among the scores x (a tile, or the row): s >= t when the search split off
    # exactly k; else s > t plus ties at t, the first `room` of them by chunk order when they
    # straddle the k-th place (`seen` of them came in earlier tiles). Never -inf.
    finite = x > float("-inf")
    if exact != 0:
        pick = (x >= t) & finite
    else:
        eq = x == t
        if ties != 0:
            rank = seen + tl.cumsum(eq.to(tl.int32), 0)
            seen += tl.sum(eq.to(tl.int32), 0)
            eq = eq & (rank <= room)
        pick = ((x > t) | eq) & finite
    return pick, seen


@triton.jit
def tie_cut(srow, C, t, room, TILE: tl.constexpr):
    # the smallest m with `room` scores == t at chunks below m in the row srow (0 < room < its
    # ties): the ties a pick keeps are the first by chunk index. Bisection on m in (0, C], one
    # pass over the row a step (ties straddle the k-th place rarely among float scores)
    lo = tl.zeros([], tl.int32)
    hi = tl.zeros([], tl.int32) + C
    while hi - lo > 1:
        mid = (lo + hi) // 2
        acc = tl.zeros([TILE], dtype=tl.int32)
        for start in range(0, C, TILE):
            x = score_tile(srow, C, start, TILE)
            acc += ((x == t) & (start + tl.arange(0, TILE) < mid)).to(tl.int32)
        below = tl.sum(acc, 0)
        lo = tl.where(below >= room, lo, mid)
        hi = tl.where(below >= room, mid, hi)
    return hi


@triton.jit
def kth_threshold(s, srow, C, k, STREAM: tl.constexpr, TILE: tl.constexpr, ROW_TILE: tl.constexpr):
    # (t, cut): the k best of a row (0 < k <= its finite scores) are its finite scores > t and
    # those == t at chunks below cut (`tie_cut` over the row srow of C, ROW_TILE at a time; C where
    # no tie straddles the k-th place). s: the scores searched, in registers (a subset holding the
    # k-th place: its ties are all there), or with STREAM the row read TILE at a time
    n, s_min, s_max, s_sum, s_sq = row_stats(s, srow, C, STREAM, TILE)
    mean = s_sum / n
    t, exact, _ = kth_interp(s, k, n, s_min, s_max, mean, tl.sqrt(tl.maximum(s_sq / n - mean * mean, 0.0)),
                             srow, C, STREAM, TILE)
    cut = tl.zeros([], tl.int32) + C
    if exact == 0:  # t is the k-th largest itself, and ties at t straddle the k-th place
        n_eq = row_count(s, srow, C, t, True, STREAM, TILE)
        room = k - (row_count(s, srow, C, t, False, STREAM, TILE) - n_eq)
        cut = tie_cut(srow, C, t, room, ROW_TILE)
    return t, cut
