# one attention layer at the engine's prefill shapes: where FlexAttention's time goes
import sys, time, torch
sys.path.insert(0, "/root/src")
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention, BlockMask
from gsa_rag.kernels.bench import decode_case
from gsa_rag.kernels import prefill
from gsa_rag.masks import dense_gist_mask, visible

arch, L = sys.argv[1], int(sys.argv[2])
Hq, Hkv, D = (9, 3, 64) if arch == "smol" else (32, 8, 128)
config, layout = decode_case(1, L, 8, device="cuda")
T = layout.seq_len
R = T - 32
P = config.num_previous_chunks
torch.manual_seed(0)
q = torch.randn(1, Hq, R, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)

def timeit(fn, reps=10):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / reps

mask = dense_gist_mask(layout, P)[:, :R]
t0 = time.perf_counter()
plan = prefill.masked_prefill_plan(lambda lo, hi: mask[:, lo:hi], prefill.front_columns(layout), size=(1, R, T))
torch.cuda.synchronize(); print(f"plan build {1e3*(time.perf_counter()-t0):.1f} ms (whole mask given)")
bm = plan.block_mask
nfull = int(bm.full_kv_num_blocks.sum()); npart = int(bm.kv_num_blocks.sum())
nq = plan.block_of.shape[1]
print(f"T={T} R={R} row blocks {nq}, full blocks {nfull}, partial {npart}, causal blocks {nq*(nq+1)//2}")
dense_us = timeit(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
print(f"dense causal SDPA (flash, R rows over R keys): {dense_us:.3f} ms")
print(f"masked_prefill (engine, dynamic compile): {timeit(lambda: prefill.masked_prefill(q, k, v, plan)):.3f} ms")
# the parts of masked_prefill
Tp = plan.block_of.shape[2] * 128; Rp = nq * 128
idx = plan.perm[:, None, :, None].expand(1, Hkv, Tp, D)
kk, vv = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
qq = q.new_zeros(1, Hq, Rp, D); qq[:, :, :R] = q
print(f"  gather K,V + pad q: {timeit(lambda: (torch.gather(k, 2, idx), torch.gather(v, 2, idx), q.new_zeros(1, Hq, Rp, D))):.3f} ms")
dyn = prefill._flex(dynamic=True)
stat = torch.compile(flex_attention, dynamic=False)
print(f"  flex dynamic only: {timeit(lambda: dyn(qq, kk, vv, block_mask=bm, enable_gqa=True)):.3f} ms")
print(f"  flex static: {timeit(lambda: stat(qq, kk, vv, block_mask=bm, enable_gqa=True)):.3f} ms")
# same blocks, no mask_mod work (partial blocks computed as full): the kernel's speed bound
bm_nomod = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                    BLOCK_SIZE=128, mask_mod=None, seq_lengths=(Rp, Tp))
print(f"  flex static, partial as full (no mask_mod): {timeit(lambda: stat(qq, kk, vv, block_mask=bm_nomod, enable_gqa=True)):.3f} ms")
# analytic mask_mod on the original columns (the rule itself, no table)
perm = plan.perm
def rule(b, h, qi, ki):
    kv = perm[b, ki]
    return visible(layout, b, qi, kv, P, layout.is_gist[b, kv]) & (ki < T) & (qi < R)
bm_rule = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                   BLOCK_SIZE=128, mask_mod=rule, seq_lengths=(Rp, Tp))
try:
    print(f"  flex static, analytic rule: {timeit(lambda: stat(qq, kk, vv, block_mask=bm_rule, enable_gqa=True)):.3f} ms")
except Exception as e:
    print("rule failed", type(e).__name__, str(e)[:300])
for opts in ({"BLOCK_M": 64, "BLOCK_N": 64}, {"BLOCK_M": 128, "BLOCK_N": 64}, {"num_warps": 8}, {"num_stages": 3}):
    try:
        f = torch.compile(flex_attention, dynamic=False)
        print(f"  flex static {opts}: {timeit(lambda: f(qq, kk, vv, block_mask=bm, enable_gqa=True, kernel_options=opts)):.3f} ms")
    except Exception as e:
        print("  opts", opts, "failed", type(e).__name__, str(e)[:200])
# error vs SDPA under the dense mask (a slice of rows)
out = prefill.masked_prefill(q, k, v, plan)
rows = slice(R - 512, R)
ref = F.scaled_dot_product_attention(q[:, :, rows], k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1),
                                     attn_mask=mask[:, None, rows])
print(f"err vs SDPA (last 512 rows): {((out[:, :, rows]-ref).float().norm()/ref.float().norm()).item():.2e}")
