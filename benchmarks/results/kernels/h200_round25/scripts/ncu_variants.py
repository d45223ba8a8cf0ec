"""One launch of the balanced split kernel in its slow (`as_is`) and a fast (`first_mul`) form,
for ncu (--profile-from-start off): same inputs, same splits (variants.py's, without its DBG store)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from variants import case, load_variant

q, k, v, idx, ln, out = case()
mods = {name: load_variant(name, debug=False) for name in ("as_is", "first_mul")}
for mod in mods.values():  # compiled outside the profiled range
    mod.sparse_decode_triton(q, k, v, idx, ln, out=out)
torch.cuda.synchronize()
for name, mod in mods.items():
    torch.cuda.profiler.start()
    mod.sparse_decode_triton(q, k, v, idx, ln, out=out)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("ran", name, flush=True)
