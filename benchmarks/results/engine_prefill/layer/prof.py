import sys, time, torch
sys.path.insert(0, "/root/src")
from gsa_rag.kernels.bench import decode_case, random_model
from gsa_rag import attention
from gsa_rag.generation import forward, _cache_keyword
from transformers import DynamicCache
arch, L, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
attention.FLEX_MIN_ROWS = 0
attention.FLEX_PREFILL = mode == "flex"
model = random_model(arch, 8 if arch == "llama3-8b" else None, "cuda")
config, layout = decode_case(1, L, 8, device="cuda")
def once():
    with torch.inference_mode():
        if mode == "hf":
            from gsa_rag.kernels.bench import set_attention
            set_attention(model, "sdpa")
            model(input_ids=layout.input_ids, position_ids=layout.position_ids, use_cache=True, logits_to_keep=1, **{_cache_keyword(model): DynamicCache()})
        else:
            forward(model, layout, layout.seq_len, DynamicCache(), config, logits_to_keep=1)
    torch.cuda.synchronize()
once(); once()
ts = []
for _ in range(3):
    t = time.perf_counter(); once(); ts.append(1e3 * (time.perf_counter() - t))
print(mode, "wall ms", [round(x, 1) for x in ts])
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    once()
ka = prof.key_averages()
print(ka.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
print(ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
