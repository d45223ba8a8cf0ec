"""Window select sweep: (part, warps, sample) against the search kernel, qk rows, graph replay (us).

    python wsweep.py OUT.json [long | mid]
"""
import importlib.util, itertools, json, os, sys
import torch
from gsa_rag.kernels import gist_select, window_select
from gsa_rag.kernels.bench import bench_us
from gsa_rag.kernels.gist_select import ENDS_BLOCKS, ends_width, select_counters, topk_union_launch

spec = importlib.util.spec_from_file_location("sk", os.environ["REPO"] + "/benchmarks/select_kernel.py")
sk = importlib.util.module_from_spec(spec); spec.loader.exec_module(sk)
torch.manual_seed(0)
out = []
if sys.argv[2:] == ["mid"]:  # r6.sh: 256K at batch 2 and 4, the defaults (parts of 8K, 8 warps, 1K samples)
    cases = [(2, 32768, 1024, 262144), (4, 32768, 1024, 262144)]
    grid = [(8192, 8, 1024)]
elif sys.argv[2:] == ["long"]:  # r3.sh: 256K (ran as a copy of this file with these two lines)
    cases = [(1, 32768, 1024, 262144), (8, 32768, 1024, 262144)]
    grid = [(p, w, 1024) for p in (4096, 8192, 16384) for w in (8, 16)]
else:  # r2.sh
    cases = [(1, 16384, 512, 131072), (8, 16384, 512, 131072), (1, 4096, 128, 32768), (1, 3704, 4, None)]
    grid = [(p, w, s) for p in (2048, 4096, 8192) for w in (8, 16) for s in (1024, 2048)]
for B, C, k, ctx in cases:
    rows, plan = sk.case_inputs(B, C, k, ctx, "qk")
    C = rows.shape[-1]
    Hq, Hkv = 32, 8
    sizes = torch.empty(B, Hkv, C, dtype=torch.int32, device="cuda")
    ends = torch.empty(B, Hkv, ends_width(C, ENDS_BLOCKS), dtype=torch.int32, device="cuda")
    picks = torch.empty(B, Hq, C, dtype=torch.int8, device="cuda")
    counters = select_counters(B, Hq, "cuda")
    def launch(window):
        def run():
            counters.zero_()
            topk_union_launch(rows, plan.k, plan.chunk_ptr, plan.chunk_ptr.stride(0), picks, sizes, ends, counters, Hkv,
                              ends_mode=ENDS_BLOCKS, window=window)
        return run
    launch(False)(); want = (sizes.clone(), ends.clone())
    res = {"B": B, "C": C, "search": bench_us(launch(False), cuda_graph=True)}
    for part, warps, sample in grid:
        if part > 2 * C:
            continue
        window_select.WINDOW_PART_MIN = window_select.WINDOW_PART_MAX = part
        window_select.window_warps = lambda p, w=warps: w
        window_select.WINDOW_SAMPLE = sample
        sizes.fill_(-1); launch(True)()
        same = torch.equal(sizes, want[0]) and torch.equal(ends, want[1])
        res[f"p{part}_w{warps}_s{sample}"] = round(bench_us(launch(True), cuda_graph=True), 1) if same else "DIFF"
    res["search"] = round(res["search"], 1)
    print(json.dumps(res), flush=True)
    out.append(res)
json.dump(out, open(sys.argv[1], "w"), indent=1)
