# time patched copies of sparse_decode's balanced split kernel at 128K batch 1 (diagnosis only)
import importlib.util, os, sys, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_decode_balanced as sd  # the module as it ran (0907a3e without the early return)
from gsa_rag.kernels.bench import bench_us
import os.path
src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparse_decode_balanced.py")).read()
OLD_START = '            rows, n_all, splits, ends, step = row_splits(LEN, s_lb, s_lh, Hkv, NR, split_len, BLOCK_N, MAX_BLOCKS, NR_PAD)\n'
OLD_END = "            end = tl.minimum(start + step, n)\n"
SCALAR_TEXT = '            total = 0\n            for r in range(0, NR):\n                total += tl.load(LEN + (r // Hkv) * s_lb + (r % Hkv) * s_lh)\n            step = tl.minimum(tl.maximum(tl.cdiv(tl.cdiv(total, split_len), BLOCK_N), 1), MAX_BLOCKS) * BLOCK_N\n            row = 0\n            n = 0\n            first = 0\n            at = 0\n            for r in range(0, NR):\n                n_r = tl.load(LEN + (r // Hkv) * s_lb + (r % Hkv) * s_lh)\n                s_r = tl.maximum(tl.cdiv(n_r, step), 1)\n                take = (p >= at) & (p < at + s_r)\n                row = tl.where(take, r, row)\n                n = tl.where(take, n_r, n)\n                first = tl.where(take, at, first)\n                at += s_r\n            start = (p - first) * step\n            end = tl.minimum(start + step, n)\n'
HINT = ("            end = tl.minimum(start + step, n)\n",
        "            start = tl.multiple_of(start, BLOCK_N)\n            end = tl.minimum(start + step, n)\n")
FIXED = ("            row = tl.minimum(tl.sum((ends <= p).to(tl.int32), 0), NR - 1)\n",
         "            row = tl.minimum(tl.sum((ends <= p).to(tl.int32), 0), NR - 1)\n            row = tl.minimum(p // 31, NR - 1)\n")
FIXED2 = ("            start = (p - tl.sum(tl.where(this, ends - splits, 0), 0)) * step\n",
          "            start = (p % 31) * 576\n            step = 576\n")
src_lines = src
a = src.index(OLD_START); b = src.index(OLD_END) + len(OLD_END)
SCALAR = (src[a:b], SCALAR_TEXT)
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
variants = {"as_is": [DBG], "first_mul": [FIRST_MUL, DBG]}
made = []
real = sd._partials
torch.manual_seed(0)
B, T, cap = 1, 131072 + 64, 18478
q = torch.randn(B, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(B, 8, T, 128, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
idx = torch.randint(0, T, (B, 8, cap), device="cuda", dtype=torch.int32).sort(-1).values
import os
ln = torch.full((B, 8), 17500, dtype=torch.int32, device="cuda")
if os.environ.get("UNEVEN"):
    ln = torch.tensor([[17500, 9000, 12000, 17000, 4000, 16000, 17500, 11000]], dtype=torch.int32, device="cuda")
out = torch.empty(B, 32, 128, device="cuda", dtype=torch.bfloat16)
ref = sd.sparse_decode_ref(q.float(), k.float(), v.float(), idx, ln)
print("host plan", sd.split_plan(ln, 64, sd.default_programs(q.device))[0], int(sd.split_plan(ln, 64, 264)[1].sum()))
for name, patches in variants.items():
    s = src
    for a, b in patches:
        assert a in s, (name, a)
        s = s.replace(a, b)
    path = f"/tmp/sd_{name}.py"
    open(path, "w").write(s)
    spec = importlib.util.spec_from_file_location(f"sd_{name}", path)
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
    real_p = mod._partials
    mod._partials = lambda *a: made.append([t.fill_(float("nan")) for t in real_p(*a)]) or made[-1]
    made.clear()
    mod.sparse_decode_triton(q, k, v, idx, ln, out=out)
    torch.cuda.synchronize()
    lv = made[0][1][:, 0].double()
    print(name, "start/64*1000+end/64 per program:", [int(x) if x == x else None for x in lv.tolist()][:40], "...", [int(x) if x == x else None for x in lv.tolist()][240:])
    for bal in ((True,)):
        mod.BALANCED_SPLITS = bal
        o = mod.sparse_decode_triton(q, k, v, idx, ln, out=out)
        err = float((o.float() - ref).norm() / ref.norm())
        us = bench_us(lambda: mod.sparse_decode_triton(q, k, v, idx, ln, out=out), cuda_graph=True)
        regs = []
        for cache in mod._split_kernel.device_caches.values():
            for kern in cache[0].values():
                open(f"/root/out/{name}_{kern.n_regs}.cubin", "wb").write(kern.asm["cubin"])
                regs.append((kern.n_regs, kern.n_spills, kern.metadata.shared, "cp.async", kern.asm["ptx"].count("cp.async"),
                             "ld.global", kern.asm["ptx"].count("ld.global"), "async_copy", kern.asm["ttgir"].count("async_copy")))

        print(name, "balanced", bal, "us", round(us, 1), "err", round(err, 5), "regs/spills/smem", regs)
