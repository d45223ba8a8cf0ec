"""Which kernel boundaries of the decode step gain or lose under PDL: the step's graph replayed
with PDL on for every launcher but one, alternating, at one batch size (argv[1])."""
import math, sys
import torch
from gsa_rag.kernels.bench import SHAPES, decode_case, bench_us, input_copies
import gsa_rag.kernels.gist_select as gs
import gsa_rag.kernels.sparse_decode as sd
import gsa_rag.kernels.pdl as pdl
from gsa_rag.kernels.gist_select import DecodePlan, select_index_list
from gsa_rag.kernels.sparse_decode import sparse_decode_triton

real = pdl.pdl_launch
ON = set()
MODE = ["parts"]

def chosen(device, when=True):
    caller = sys._getframe(1).f_code.co_name
    if MODE[0] == "policy":  # the committed rule, but for the launchers named in OFF
        return {"PDL": False} if caller in OFF else real(device, when)
    return real(device) if caller in ON else {"PDL": False}

OFF = set()

gs.pdl_launch = sd.pdl_launch = chosen
B = int(sys.argv[1]); L = int(sys.argv[2]) * 1024
Hq, Hkv, D = SHAPES["llama3-8b"]
SCORE = sys.argv[3] if len(sys.argv) > 3 else "int8"
config, layout = decode_case(B, L, 8, (), 4, SCORE, device="cuda")
layout = layout.append(torch.full((B, 1), 7, device="cuda"))
T = layout.seq_len
copies = input_copies(B * Hkv * T * D * 2 * 2)
sets = [(torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16),
         torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16),
         torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)) for _ in range(copies)]
plan = DecodePlan.build(layout, config, Hq // Hkv)
out = torch.empty(B, Hq, D, device="cuda", dtype=torch.bfloat16)

def step(i):
    q, k, v = sets[i]
    index, lengths = select_index_list(q, k, layout, plan, config, 1, True)
    return sparse_decode_triton(q, k, v, index, lengths, 1 / math.sqrt(D), out=out)

launchers = ["_scores_launch", "topk_union_launch", "_expand_launch", "sparse_decode_triton", "combine_splits"]
configs = {"policy": None, "all": set(launchers), "none": set()}
for name in launchers:
    configs["policy but " + name + " plain"] = name
results = {name: [] for name in configs}
for rep in range(3):
    for name, on in configs.items():
        MODE[0] = "parts" if isinstance(on, set) else "policy"
        ON.clear(); OFF.clear()
        if isinstance(on, set):
            ON.update(on)
        elif on:
            OFF.add(on)
        results[name].append(bench_us(lambda: [step(i) for i in range(copies)], cuda_graph=True) / copies)
print(f"batch {B}, {L // 1024}K, {SCORE} scoring, copies {copies}: step us (graph replay), 3 alternating runs")
for name, ts in results.items():
    print(f"  {name:36s} " + " ".join(f"{t:6.1f}" for t in ts) + f"   min {min(ts):6.1f}")
