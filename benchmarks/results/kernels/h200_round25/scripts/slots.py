import torch
from gsa_rag.kernels import sparse_decode as sd
made = []
real = sd._partials
sd._partials = lambda *a: made.append([t.fill_(float("nan")) for t in real(*a)]) or made[-1]
torch.manual_seed(0)
for B, n in ((1, 17500), (1, 9000), (2, 17500), (8, 17500)):
    T, cap = 131072 + 64, 18478
    q = torch.randn(B, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 8, T, 128, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
    idx = torch.randint(0, T, (B, 8, cap), device="cuda", dtype=torch.int32).sort(-1).values
    ln = torch.full((B, 8), n, dtype=torch.int32, device="cuda")
    made.clear()
    sd.sparse_decode_triton(q, k, v, idx, ln)
    torch.cuda.synchronize()
    m = made[0][0][:, 0]
    step, splits = sd.split_plan(ln, 64, sd.default_programs(q.device))
    print("B", B, "n", n, "host step", step, "splits", int(splits.sum()), "grid", m.shape[0], "finite", int(m.isfinite().sum()),
          "-inf", int((m == float("-inf")).sum()), "nan", int(m.isnan().sum()), flush=True)
