# Upper bound of "prefetch the likely-selected raw K/V into L2 while the select runs" (128K batch 1,
# Llama-3-8B shapes): the split attention's time after an L2 flush, with a share f of its listed
# chunks loaded beforehand by another kernel (not timed), and that kernel's own time.
import torch, triton, triton.language as tl, statistics
from gsa_rag.kernels import sparse_decode as sd

@triton.jit
def touch(K, V, IDX, LEN, OUT, s_kh, s_kt, s_ih, BLOCK: tl.constexpr, D: tl.constexpr):
    h = tl.program_id(0); j = tl.program_id(1)
    n = tl.load(LEN + h)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    cols = tl.load(IDX + h * s_ih + offs, mask=ok, other=0).to(tl.int64)
    d = tl.arange(0, D)
    k = tl.load(K + h * s_kh + cols[:, None] * s_kt + d[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(V + h * s_kh + cols[:, None] * s_kt + d[None, :], mask=ok[:, None], other=0.0)
    tl.store(OUT + h * 4096 + j, tl.sum(tl.sum(k.to(tl.float32) + v.to(tl.float32), 1), 0))

torch.manual_seed(0)
T, Hkv, D, CH, K_CH = 131072 + 64, 8, 128, 8, 2052
k = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
q = torch.randn(1, 32, D, device="cuda", dtype=torch.bfloat16)
chunks = torch.stack([torch.randperm(T // CH - 1, device="cuda")[:K_CH].sort().values for _ in range(Hkv)])
idx = (chunks[..., None] * CH + torch.arange(CH, device="cuda")).view(1, Hkv, -1).int()
n = idx.shape[-1]
ln = torch.full((1, Hkv), n, dtype=torch.int32, device="cuda")
out = torch.empty(1, 32, D, device="cuda", dtype=torch.bfloat16)
flush = torch.ones(128 << 20, dtype=torch.int32, device="cuda")  # read, never written: L2 holds clean lines only
sink = torch.empty((), dtype=torch.int32, device="cuda")
dummy = torch.empty(Hkv * 4096, device="cuda")
attend = lambda: sd.sparse_decode_triton(q, k, v, idx, ln, out=out)
attend(); torch.cuda.synchronize()
print("list", n, "per head; attention bytes MB", round(n * Hkv * D * 2 * 2 / 1e6, 1))

def pre_lists(f, order):
    # a share f of each head's chunks: 'rand' a random subset, 'first' the list's first chunks
    m = int(round(f * K_CH))
    if order == "first":
        sel = torch.arange(m, device="cuda").expand(Hkv, m)
    else:
        sel = torch.stack([torch.randperm(K_CH, device="cuda")[:m].sort().values for _ in range(Hkv)])
    sub = torch.gather(chunks, 1, sel) if m else chunks[:, :0]
    pidx = (sub[..., None] * CH + torch.arange(CH, device="cuda")).view(Hkv, -1).int().contiguous()
    return pidx, torch.full((Hkv,), pidx.shape[1], dtype=torch.int32, device="cuda")

import triton.testing
def g_us(*fns):
    def run():
        for f in fns:
            f()
    return 1e3 * triton.testing.do_bench_cudagraph(run, rep=200, return_mode="median")

def flush_l2():
    torch.amax(flush, 0, out=sink)

t_flush = g_us(flush_l2)
print("flush us", round(t_flush, 1), "attention alone, no flush (graph) us", round(g_us(attend), 1))
for order in ("rand", "first"):
    for f in (0.0, 0.25, 0.5, 0.65, 0.8, 1.0):
        pidx, pln = pre_lists(f, order)
        blocks = max(1, triton.cdiv(pidx.shape[1], 64))
        pre = lambda: touch[(Hkv, blocks)](k, v, pidx, pln, dummy, k.stride(1), k.stride(2), pidx.stride(0), BLOCK=64, D=D) if pidx.shape[1] else None
        pre = pre if pidx.shape[1] else (lambda: None)
        t_fp = g_us(flush_l2, pre)
        t_att = g_us(flush_l2, pre, attend) - t_fp
        t_pre = t_fp - t_flush
        mb = pidx.shape[1] * Hkv * D * 4 / 1e6
        print(f"{order:5s} f {f:.2f} prefetched MB {mb:5.1f}  attention us {t_att:6.1f}  prefetch kernel us {t_pre:6.1f}", flush=True)
