# NOTES round 26 (planned in round 25): the split kernel loading its whole split's indices
# once and taking each step's from registers (tl.gather), so no step waits on an index load.
# Patched copy of kernels/sparse_decode.py, A/B against the module as it is, at 128K batch 1 and 8
# (CUDA) or a correctness check (CPU: TRITON_INTERPRET=1).
import importlib.util, os, sys, torch
from gsa_rag.kernels import sparse_decode as sd
src = open(sd.__file__).read()
PATCHES = [
    ("""        offs = start + tl.arange(0, BLOCK_N)
        cols = tl.load(idx_base + offs * s_in, mask=offs < end, other=0).to(tl.int64)
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            live = offs < end
            nxt = offs + BLOCK_N
            cols_next = tl.load(idx_base + nxt * s_in, mask=nxt < end, other=0).to(tl.int64)
""", """        span = start + tl.arange(0, SPLIT_PAD)
        split_cols = tl.load(idx_base + span * s_in, mask=span < end, other=0)
        for n0 in range(start, end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            live = offs < end
            cols = tl.gather(split_cols, offs - start, 0).to(tl.int64)
"""),
    ("""            m_i, l_i, acc = online_softmax_step(q, k, v, live, m_i, l_i, acc, qk_scale, PRECISION)
            cols = cols_next
""", """            m_i, l_i, acc = online_softmax_step(q, k, v, live, m_i, l_i, acc, qk_scale, PRECISION)
"""),
    ("""        PDL: tl.constexpr = False,
    ):
        wait_for_previous(PDL)
        pid = tl.program_id(0)
        split = tl.program_id(1)""", """        PDL: tl.constexpr = False, SPLIT_PAD: tl.constexpr = 1024,
    ):
        wait_for_previous(PDL)
        pid = tl.program_id(0)
        split = tl.program_id(1)"""),
    ("""        G_PAD=G_PAD, D=D, BLOCK_N=block_n, **pdl_launch(query.device),""",
     """        G_PAD=G_PAD, D=D, BLOCK_N=block_n, SPLIT_PAD=next_pow2(split_len), **pdl_launch(query.device),"""),
]
for a, b in PATCHES:
    assert src.count(a) == 1, a[:80]
    src = src.replace(a, b)
path = "/tmp/sd_gather_idx.py"
open(path, "w").write(src)
spec = importlib.util.spec_from_file_location("sd_gather_idx", path)
new = importlib.util.module_from_spec(spec); sys.modules[spec.name] = new; spec.loader.exec_module(new)
torch.manual_seed(0)
if not torch.cuda.is_available():  # CPU: the patched kernel against the reference
    for B, Hq, Hkv, D, T, cap in [(2, 8, 2, 64, 700, 600), (1, 9, 3, 64, 300, 250), (2, 32, 8, 128, 200, 150)]:
        q = torch.randn(B, Hq, D); k = torch.randn(B, Hkv, T, D); v = torch.randn(B, Hkv, T, D)
        idx = torch.stack([torch.stack([torch.randperm(T)[:cap] for _ in range(Hkv)]) for _ in range(B)]).int()
        ln = torch.randint(1, cap + 1, (B, Hkv)).int()
        for splits in (None, 1, 3):
            got = new.sparse_decode_triton(q, k, v, idx, ln, num_splits=splits, block_n=16)
            ref = sd.sparse_decode_ref(q.double(), k.double(), v.double(), idx, ln)
            print((B, Hq, Hkv, D), splits, "rel err", float((got.double() - ref).norm() / ref.norm()))
    sys.exit()
from gsa_rag.kernels.bench import bench_us
for B in (1, 8):
    T, cap = 131072 + 64, 18478
    q = torch.randn(B, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 8, T, 128, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
    idx = torch.randint(0, T, (B, 8, cap), device="cuda", dtype=torch.int32).sort(-1).values
    ln = torch.full((B, 8), 17500, dtype=torch.int32, device="cuda")
    out = torch.empty(B, 32, 128, device="cuda", dtype=torch.bfloat16)
    ref = sd.sparse_decode_ref(q.float(), k.float(), v.float(), idx, ln)
    for mod in (sd, new, sd, new):
        o = mod.sparse_decode_triton(q, k, v, idx, ln, out=out)
        err = float((o.float() - ref).norm() / ref.norm())
        us = bench_us(lambda: mod.sparse_decode_triton(q, k, v, idx, ln, out=out), cuda_graph=True)
        regs = [(kern.n_regs, kern.metadata.shared) for c in mod._split_kernel.device_caches.values() for kern in c[0].values()]
        print("B", B, mod.__name__, "us", round(us, 1), "err", round(err, 5), "regs/smem", regs, flush=True)
