"""Is PDL available in this Triton, does it capture into a CUDA graph, and what does it save
a boundary? A chain of N dependent kernels (each reads the previous one's output)."""
import sys, torch, triton, triton.language as tl
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
from triton.language.extra.cuda import gdc_wait, gdc_launch_dependents

@triton.jit
def step(X, Y, n, PDL: tl.constexpr, WORK: tl.constexpr, BLOCK: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    for _ in range(WORK):
        x = x * 1.0001 + 0.5
    tl.store(Y + offs, x, mask=offs < n)

def chain(bufs, n, programs, pdl, work, N):
    for i in range(N):
        step[(programs,)](bufs[i % 2], bufs[(i + 1) % 2], n, PDL=pdl, WORK=work, BLOCK=1024,
                          num_warps=4, launch_pdl=pdl)

def time_graph(fn, reps=200):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(10): g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
    best = []
    for _ in range(5):
        e0.record()
        for _ in range(reps): g.replay()
        e1.record(); torch.cuda.synchronize()
        best.append(e0.elapsed_time(e1) * 1e3 / reps)
    return min(best)

for programs in (32, 264, 1024):
    for work in (0, 200):
        n = programs * 1024
        bufs = [torch.randn(n, device="cuda"), torch.empty(n, device="cuda")]
        ref = None
        res = {}
        for pdl in (False, True):
            bufs[0].copy_(torch.arange(n, device="cuda", dtype=torch.float32) % 7)
            chain(bufs, n, programs, pdl, work, 6); torch.cuda.synchronize()
            out = bufs[0].clone()
            if ref is None: ref = out
            else: assert torch.equal(ref, out), "PDL changed the chain's result"
            res[pdl] = (time_graph(lambda: chain(bufs, n, programs, pdl, work, 6)),
                        time_graph(lambda: chain(bufs, n, programs, pdl, work, 1)))
        print(f"programs {programs:5d} work {work:4d}: 6 kernels {res[False][0]:6.2f} -> PDL {res[True][0]:6.2f} us; "
              f"1 kernel {res[False][1]:6.2f} -> {res[True][1]:6.2f}", flush=True)
