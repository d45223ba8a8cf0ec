import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gsa_rag.kernels import sparse_decode
kernel = sparse_decode._split_kernel
types = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "IDX": "*i32", "LEN": "*i32", "M": "*fp32", "L": "*fp32", "ACC": "*fp32", "qk_scale": "fp32"}
for bal in (False, True):
    values = {"G_PAD": 16, "D": 128, "BLOCK_N": 64, "DOT_F32": False, "PRECISION": "tf32", "BALANCED": bal, "NR_PAD": 8, "MAX_BLOCKS": 16, "PDL": True}
    signature = {n: "constexpr" if n in values else types.get(n, "i32") for n in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=signature, constexprs={(kernel.arg_names.index(n),): v for n, v in values.items()})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    ptx = c.asm["ptx"]
    print(bal, "cp.async", ptx.count("cp.async"), "ld.global", ptx.count("ld.global"), "lines", len(ptx.splitlines()))
