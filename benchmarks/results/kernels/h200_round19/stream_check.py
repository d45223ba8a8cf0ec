# Is a bf16 forward of the random 135M model bitwise the same on the default stream and on a side stream?
# (the graph decoder's warm step runs on a side stream; graph err 0.014-0.019 at 135M batch 8 only)
import torch
from gsa_rag.kernels.bench import random_model

model = random_model("smollm2-135m", device="cuda")
model.set_attn_implementation("sdpa")
for batch in (1, 8):
    ids = torch.randint(1, 999, (batch, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        a = model(input_ids=ids).logits.float()
        b = model(input_ids=ids).logits.float()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            c = model(input_ids=ids).logits.float()
            d = model(input_ids=ids[:, -1:]).logits.float()
        torch.cuda.current_stream().wait_stream(side)
        e = model(input_ids=ids[:, -1:]).logits.float()
    rel = lambda x, y: ((x - y).norm() / y.norm()).item()
    print(f"batch {batch}: default twice {rel(b, a):.3g}; side vs default {rel(c, a):.3g}; one-row side vs default {rel(d, e):.3g}")
