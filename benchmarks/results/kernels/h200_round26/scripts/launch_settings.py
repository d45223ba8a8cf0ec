# The split attention at 128K (Llama-3-8B shapes) under launch settings its module fixes: warps and
# pipeline stages (patched copy of kernels/sparse_decode.py), key block and splits. Outputs checked
# against the reference, us per call (split + combine), CUDA-graph replay.
#   python launch_settings.py splits  # many_splits.txt: many one-to-few-block programs (the touch kernel of
#                                     # prefetch_ub.py gathered the same 67 MB in 18.9 us, one 64-key block a program)
#   python launch_settings.py block   # block_n.txt: 128- and 256-key blocks
import importlib.util, sys, torch, triton
from gsa_rag.kernels import sparse_decode as sd
from gsa_rag.kernels.bench import bench_us


def settings(sweep, B, n, default):
    # (block_n, warps, stages, splits)
    if sweep == "splits":
        cuts = sorted({default, 2 * default, 4 * default, triton.cdiv(n, 128), triton.cdiv(n, 64)})
        return [(64, w, st, s) for w in (4, 2) for st in (3, 2, 1) for s in cuts if B == 1 or s <= 4 * default]
    return [(bn, w, st, s) for bn, w, st in [(64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2), (128, 8, 3), (64, 8, 3), (256, 8, 2)]
            for s in sorted({default // 2, default, 2 * default})]


src = open(sd.__file__).read()
a = "num_warps=4, num_stages=3 if query.is_cuda else 1,"
assert src.count(a) == 1
src = src.replace(a, "num_warps=NUM_WARPS, num_stages=NUM_STAGES if query.is_cuda else 1,") + "\nNUM_STAGES = 3\nNUM_WARPS = 4\n"
open("/tmp/sd_stages.py", "w").write(src)
spec = importlib.util.spec_from_file_location("sd_stages", "/tmp/sd_stages.py")
m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)
torch.manual_seed(0)
T, Hkv, D, CH, K_CH = 131072 + 64, 8, 128, 8, 2052
for B in (1, 8):
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
    q = torch.randn(B, 32, D, device="cuda", dtype=torch.bfloat16)
    chunks = torch.stack([torch.randperm(T // CH - 1, device="cuda")[:K_CH].sort().values for _ in range(B * Hkv)])
    idx = (chunks[..., None] * CH + torch.arange(CH, device="cuda")).view(B, Hkv, -1).int()
    n = idx.shape[-1]
    ln = torch.full((B, Hkv), n, dtype=torch.int32, device="cuda")
    out = torch.empty(B, 32, D, device="cuda", dtype=torch.bfloat16)
    ref = sd.sparse_decode_ref(q.float(), k.float(), v.float(), idx, ln)
    res = []
    for bn, warps, stages, splits in settings(sys.argv[1], B, n, sd.default_splits(n, B * Hkv, 64, q.device)):
        m.NUM_STAGES, m.NUM_WARPS = stages, warps
        try:
            o = m.sparse_decode_triton(q, k, v, idx, ln, out=out, num_splits=splits, block_n=bn)
        except Exception as e:
            print("B", B, bn, warps, stages, splits, "failed", type(e).__name__, str(e)[:100]); continue
        err = float((o.float() - ref).norm() / ref.norm())
        us = bench_us(lambda: m.sparse_decode_triton(q, k, v, idx, ln, out=out, num_splits=splits, block_n=bn), cuda_graph=True)
        res.append((us, bn, warps, stages, splits))
        print(f"B {B} block {bn} warps {warps} stages {stages} splits {splits:4d} us {us:6.1f} err {err:.5f}", flush=True)
    print("B", B, "best", sorted(res)[:3], flush=True)
    del k, v
