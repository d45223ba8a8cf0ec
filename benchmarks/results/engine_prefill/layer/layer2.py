# interval (run) mask_mod against the block table, one layer, engine prefill shapes
import sys, time, torch
sys.path.insert(0, "/root/src")
import torch.nn.functional as F
import torch._dynamo
for _n in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
    if hasattr(torch._dynamo.config, _n): setattr(torch._dynamo.config, _n, 256)
from torch.nn.attention.flex_attention import flex_attention, BlockMask
from gsa_rag.kernels.bench import decode_case
from gsa_rag.kernels import prefill
from gsa_rag.masks import dense_gist_mask

arch, L = sys.argv[1], int(sys.argv[2])
meta = tuple(int(x) for x in sys.argv[3:])
Hq, Hkv, D = (9, 3, 64) if arch == "smol" else (32, 8, 128)
config, layout = decode_case(1, L, 8, meta_chunks=meta, device="cuda")
T = layout.seq_len; R = T - 32; P = config.num_previous_chunks
torch.manual_seed(0)
q = torch.randn(1, Hq, R, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
def timeit(fn, reps=10):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / reps
mask = dense_gist_mask(layout, P)[:, :R]
plan = prefill.masked_prefill_plan(lambda lo, hi: mask[:, lo:hi], prefill.front_columns(layout), size=(1, R, T))
bm = plan.block_mask
nq, nk = plan.block_of.shape[1:]; Rp, Tp = nq * 128, nk * 128
print(f"{arch} L={L} meta={meta}: full {int(bm.full_kv_num_blocks.sum())} partial {int(bm.kv_num_blocks.sum())}")
# runs of the permuted mask, per row
t0 = time.perf_counter()
pm = torch.zeros(1, Rp, Tp + 2, dtype=torch.bool, device="cuda")
pm[:, :R, 1:T + 1] = torch.gather(mask, 2, plan.perm[:, None, :T].expand(-1, R, -1))
d = pm[:, :, 1:] ^ pm[:, :, :-1]   # [1, Rp, Tp+1]: transitions, at column j = change between j-1 and j
rank = d.cumsum(-1, dtype=torch.int32)
nruns = rank[..., -1] // 2
Kmax = int(nruns.max())
torch.cuda.synchronize(); print(f"runs: max {Kmax}, mean {nruns.float().mean().item():.2f}, {1e3*(time.perf_counter()-t0):.1f} ms")
ex = prefill.masked_prefill(q, k, v, plan)
qq = q.new_zeros(1, Hq, Rp, D); qq[:, :, :R] = q
idx = plan.perm[:, None, :, None].expand(1, Hkv, Tp, D)
kk, vv = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
cols = torch.arange(Tp + 1, device="cuda", dtype=torch.int32).expand_as(rank)
for K in sorted({max(2, 1 << (Kmax - 1).bit_length()), 4, 8} | {Kmax}):
    if K < Kmax: continue
    slot = torch.where(d, (rank - 1).clamp(max=2 * K), 2 * K)
    tr = torch.zeros(1, Rp, 2 * K + 1, dtype=torch.int32, device="cuda").scatter_(2, slot.long(), cols)
    st, en = tr[..., 0:2 * K:2].contiguous(), tr[..., 1:2 * K:2].contiguous()
    def mm(b, h, qi, ki, st=st, en=en, K=K):
        r = (ki >= st[b, qi, 0]) & (ki < en[b, qi, 0])
        for j in range(1, K):
            r = r | ((ki >= st[b, qi, j]) & (ki < en[b, qi, j]))
        return r
    bmi = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                   BLOCK_SIZE=128, mask_mod=mm, seq_lengths=(Rp, Tp))
    for dyn in (False, True):
        for opts in (None, {"BLOCK_M": 64, "BLOCK_N": 64}):
            f = torch.compile(flex_attention, dynamic=dyn)
            try:
                ms = timeit(lambda: f(qq, kk, vv, block_mask=bmi, enable_gqa=True, kernel_options=opts))
                out = f(qq, kk, vv, block_mask=bmi, enable_gqa=True, kernel_options=opts)[:, :, :R]
                err = ((out - ex).float().abs().max()).item()
                print(f"  K={K} dynamic={dyn} {opts}: {ms:.3f} ms (max diff to table {err:.1e})")
            except Exception as e:
                print(f"  K={K} dynamic={dyn} {opts} failed {type(e).__name__} {str(e)[:200]}")
for dyn in (False, True):
    f = torch.compile(flex_attention, dynamic=dyn)
    print(f"  table dynamic={dyn} blocks 64: {timeit(lambda: f(qq, kk, vv, block_mask=bm, enable_gqa=True, kernel_options={'BLOCK_M': 64, 'BLOCK_N': 64})):.3f} ms")
print(f"  dense causal SDPA: {timeit(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)):.3f} ms")
