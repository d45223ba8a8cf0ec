"""Patched copies of 0907a3e's balanced split kernel, timed at 128K batch 1 (round 25's diagnosis).

The module they patch is `kernels/sparse_decode.py` of 0907a3e without its early return
(NORETURN), which the runs read from the working tree; `balanced_source` rebuilds it from the
git history (or from the file SD_SOURCE names, on a machine without it). The runs used other
VARIANTS sets in turn (NOTES.md round 25's table); this is the last: each program's (start, end)
stored in place of its l (DBG) and compared, then timed. UNEVEN=1: rows of unequal lengths.
"""
import importlib.util
import os
import subprocess
import sys

import torch

NORETURN = ("""            row = tl.sum((ends <= p).to(tl.int32), 0)  # the row whose splits hold p
            if p >= tl.sum(splits, 0):  # past the last row's splits: the grid's slack
                return
""", """            # the row whose splits hold p; the grid's slack (p past every split) takes the last
            # row, where its start lies past the row's end: an empty loop, a slot nobody reads
            row = tl.minimum(tl.sum((ends <= p).to(tl.int32), 0), NR - 1)
""")
OLD_START = '            rows, n_all, splits, ends, step = row_splits(LEN, s_lb, s_lh, Hkv, NR, split_len, BLOCK_N, MAX_BLOCKS, NR_PAD)\n'
OLD_END = "            end = tl.minimum(start + step, n)\n"
SCALAR_TEXT = '            total = 0\n            for r in range(0, NR):\n                total += tl.load(LEN + (r // Hkv) * s_lb + (r % Hkv) * s_lh)\n            step = tl.minimum(tl.maximum(tl.cdiv(tl.cdiv(total, split_len), BLOCK_N), 1), MAX_BLOCKS) * BLOCK_N\n            row = 0\n            n = 0\n            first = 0\n            at = 0\n            for r in range(0, NR):\n                n_r = tl.load(LEN + (r // Hkv) * s_lb + (r % Hkv) * s_lh)\n                s_r = tl.maximum(tl.cdiv(n_r, step), 1)\n                take = (p >= at) & (p < at + s_r)\n                row = tl.where(take, r, row)\n                n = tl.where(take, n_r, n)\n                first = tl.where(take, at, first)\n                at += s_r\n            start = (p - first) * step\n            end = tl.minimum(start + step, n)\n'
HINT = ("            end = tl.minimum(start + step, n)\n",
        "            start = tl.multiple_of(start, BLOCK_N)\n            end = tl.minimum(start + step, n)\n")
FIXED = ("            row = tl.minimum(tl.sum((ends <= p).to(tl.int32), 0), NR - 1)\n",
         "            row = tl.minimum(tl.sum((ends <= p).to(tl.int32), 0), NR - 1)\n            row = tl.minimum(p // 31, NR - 1)\n")
FIXED2 = ("            start = (p - tl.sum(tl.where(this, ends - splits, 0), 0)) * step\n",
          "            start = (p % 31) * 576\n            step = 576\n")
SCALAR = (OLD_START, OLD_END, SCALAR_TEXT)  # the text from OLD_START through OLD_END, replaced
STEP_CONST = ("            start = (p - tl.sum(tl.where(this, ends - splits, 0), 0)) * step\n",
              "            step = 576\n            start = (p - tl.sum(tl.where(this, ends - splits, 0), 0)) * step\n")
START_SIMPLE = ("            start = (p - tl.sum(tl.where(this, ends - splits, 0), 0)) * step\n",
                "            start = (p % 31) * step\n")
FIRST_MUL = ("            start = (p - tl.sum(tl.where(this, ends - splits, 0), 0)) * step\n",
             "            start = (p - row * 31) * step\n")
F1 = ("            start = (p - tl.sum(tl.where(this, ends - splits, 0), 0)) * step\n",
      "            start = (p - tl.sum(tl.where(rows < row, splits, 0), 0)) * step\n")
F4 = ("            start = (p - tl.sum(tl.where(this, ends - splits, 0), 0)) * step\n",
      "            start = (p - tl.sum(tl.where(ends <= p, splits, 0), 0)) * step\n")
DBG = ("        tl.store(L + slot_b * s_mb + slot_h * s_mh + split * s_ms, l_i, mask=g_ok)\n",
       "        tl.store(L + slot_b * s_mb + slot_h * s_mh + split * s_ms, (l_i * 0 + (start // 64) * 1000 + end // 64).to(tl.float32), mask=g_ok)\n")
VARIANTS = {"as_is": [DBG], "first_mul": [FIRST_MUL, DBG]}


def balanced_source() -> str:
    """0907a3e's kernels/sparse_decode.py with NORETURN applied."""
    if os.environ.get("SD_SOURCE"):
        src = open(os.environ["SD_SOURCE"]).read()
    else:
        repo = os.path.dirname(os.path.abspath(__file__))
        src = subprocess.run(["git", "-C", repo, "show", "0907a3e:kernels/sparse_decode.py"], check=True,
                             capture_output=True, text=True).stdout
    return patched(src, [NORETURN])


def patched(src: str, patches) -> str:
    """src with each (old, new) replaced, or for SCALAR's (first, last, new) the lines between."""
    for patch in patches:
        if len(patch) == 3:
            first, last, new = patch
            a = src.index(first)
            patch = (src[a:src.index(last, a) + len(last)], new)
        old, new = patch
        assert src.count(old) == 1, old[:80]
        src = src.replace(old, new)
    return src


def load_variant(name: str, debug: bool = True):
    """The module of VARIANTS[name] (without the DBG store where debug is False), imported."""
    patches = [p for p in VARIANTS[name] if debug or p is not DBG]
    path = f"/tmp/sd_{name}{'_dbg' if debug else ''}.py"
    with open(path, "w") as f:
        f.write(patched(balanced_source(), patches))
    spec = importlib.util.spec_from_file_location(f"sd_{name}{'_dbg' if debug else ''}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def case():
    """The 128K batch-1 inputs: q, k, v, index, lengths, out (every row 17,500 keys, or UNEVEN)."""
    torch.manual_seed(0)
    B, T, cap = 1, 131072 + 64, 18478
    q = torch.randn(B, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 8, T, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    idx = torch.randint(0, T, (B, 8, cap), device="cuda", dtype=torch.int32).sort(-1).values
    ln = torch.full((B, 8), 17500, dtype=torch.int32, device="cuda")
    if os.environ.get("UNEVEN"):
        ln = torch.tensor([[17500, 9000, 12000, 17000, 4000, 16000, 17500, 11000]], dtype=torch.int32, device="cuda")
    return q, k, v, idx, ln, torch.empty(B, 32, 128, device="cuda", dtype=torch.bfloat16)


def main() -> None:
    from gsa_rag.kernels.bench import bench_us

    q, k, v, idx, ln, out = case()
    for name in VARIANTS:
        mod = load_variant(name)
        ref = mod.sparse_decode_ref(q.float(), k.float(), v.float(), idx, ln)
        print("host plan", mod.split_plan(ln, 64, mod.default_programs(q.device))[0],
              int(mod.split_plan(ln, 64, 264)[1].sum()))
        made, real = [], mod._partials
        mod._partials = lambda *a, made=made, real=real: made.append([t.fill_(float("nan")) for t in real(*a)]) or made[-1]
        o = mod.sparse_decode_triton(q, k, v, idx, ln, out=out)
        torch.cuda.synchronize()
        spans = [int(x) if x == x else None for x in made[0][1][:, 0].double().tolist()]
        print(name, "start/64*1000+end/64 per program:", spans[:40], "...", spans[240:])
        err = float((o.float() - ref).norm() / ref.norm())  # the DBG store makes it wrong on purpose
        us = bench_us(lambda: mod.sparse_decode_triton(q, k, v, idx, ln, out=out), cuda_graph=True)
        regs = []
        for cache in mod._split_kernel.device_caches.values():
            for kern in cache[0].values():
                open(f"/root/out/{name}_{kern.n_regs}.cubin", "wb").write(kern.asm["cubin"])
                regs.append((kern.n_regs, kern.n_spills, kern.metadata.shared, "cp.async", kern.asm["ptx"].count("cp.async"),
                             "ld.global", kern.asm["ptx"].count("ld.global"), "async_copy", kern.asm["ttgir"].count("async_copy")))
        print(name, "balanced True us", round(us, 1), "err", round(err, 5), "regs/spills/smem", regs)


if __name__ == "__main__":
    main()
