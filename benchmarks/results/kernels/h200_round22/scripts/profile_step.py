"""One decode step (llama3-8b shapes, chunk 8, adaptive k) at 128K, for ncu: warm up, then
run `reps` steps between cudaProfilerStart/Stop. argv: batch score_dtype reps"""
import math, sys, torch
from gsa_rag.kernels.bench import decode_case
from gsa_rag.kernels.gist_keys8 import quantize_gist_keys
from gsa_rag.kernels.gist_select import DecodePlan, select_index_list_triton, select_index_list
from gsa_rag.kernels.sparse_decode import sparse_decode_triton

B, sd, reps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
L = int(sys.argv[4]) if len(sys.argv) > 4 else 131072
Hq, Hkv, D = 32, 8, 128
config, layout = decode_case(B, L, 8, (), 4, sd, device="cuda")
layout = layout.append(torch.full((B, 1), 7, device="cuda"))
T = layout.seq_len
q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
plan = DecodePlan.build(layout, config, Hq // Hkv)
keys8 = quantize_gist_keys(k, layout.gist_index, layout.gist_valid) if sd == "int8" else None
out = torch.empty(B, Hq, D, device="cuda", dtype=torch.bfloat16)
scale = 1 / math.sqrt(D)

def step():
    if keys8 is not None:
        index, lengths = select_index_list_triton(q, k, layout, plan, config, keys8=keys8)
    else:
        index, lengths = select_index_list(q, k, layout, plan, config, 1, True)
    return sparse_decode_triton(q, k, v, index, lengths, scale, out=out)

for _ in range(3):
    step()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
for _ in range(reps):
    step()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print("done", B, sd, T)
