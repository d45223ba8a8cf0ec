import torch, math
from gsa_rag.kernels import sparse_decode as sd
from gsa_rag.kernels.bench import bench_us
torch.manual_seed(0)
made = []
real = sd._partials
def seam(*a):
    parts = [t.fill_(float("nan")) for t in real(*a)]
    made.append(parts)
    return parts
sd._partials = seam
for B in (1, 8):
    T, cap = 131072 + 64, 18478
    q = torch.randn(B, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 8, T, 128, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
    idx = torch.randint(0, T, (B, 8, cap), device="cuda", dtype=torch.int32).sort(-1).values
    ln = torch.full((B, 8), 17500, dtype=torch.int32, device="cuda")
    out = torch.empty(B, 32, 128, device="cuda", dtype=torch.bfloat16)
    made.clear()
    sd.sparse_decode_triton(q, k, v, idx, ln, out=out)
    torch.cuda.synchronize()
    m = made[0][0]
    step, splits = sd.split_plan(ln, 64, sd.default_programs(q.device))
    print("B", B, "host step", step, "splits", int(splits.sum()), "grid", m.shape[0], "finite slots", int(m[:, 0].isfinite().sum()),
          "-inf", int((m[:, 0] == float('-inf')).sum()), "nan", int(m[:, 0].isnan().sum()))
    ref = sd.sparse_decode_ref(q.float(), k.float(), v.float(), idx, ln)
    print("  err", float((out.float() - ref).norm() / ref.norm()))
    for bal in (True, False, True, False):
        sd.BALANCED_SPLITS = bal
        us = bench_us(lambda: sd.sparse_decode_triton(q, k, v, idx, ln, out=out), cuda_graph=True)
        print("  balanced", bal, "us", round(us, 1))
    sd.BALANCED_SPLITS = True
    for progs in (132, 264, 396, 528):
        us = bench_us(lambda: sd.sparse_decode_triton(q, k, v, idx, ln, out=out, programs=progs), cuda_graph=True)
        print("  programs", progs, "us", round(us, 1))
    # split kernel alone vs combine alone (balanced)
    k_split = sd._split_kernel
    from torch.profiler import profile, ProfilerActivity
    for bal in (True, False):
        sd.BALANCED_SPLITS = bal
        for _ in range(3):
            sd.sparse_decode_triton(q, k, v, idx, ln, out=out)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                sd.sparse_decode_triton(q, k, v, idx, ln, out=out)
            torch.cuda.synchronize()
        for e in prof.key_averages():
            if "kernel" in e.key:
                print("  bal", bal, e.key[:40], "avg us", round(e.device_time_total / max(1, e.count), 1), "n", e.count)
    sd.BALANCED_SPLITS = True
