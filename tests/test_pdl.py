"""Programmatic dependent launch (gsa_rag.kernels.pdl): when it is asked for, and that every
kernel launched with it waits for the previous kernel before it touches memory.

The kernels' results under PDL are the GPU suite's (every kernel test on CUDA launches with it);
here, on the CPU: the launch switch, the source rule that makes PDL safe, and the compiled form
of that rule for sm_90 (Triton compiles for Hopper without a GPU)."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton not installed (the kernels under test are Triton's)")

import gsa_rag.kernels.gist_select as gist_select  # noqa: E402
import gsa_rag.kernels.hier_select as hier_select  # noqa: E402
import gsa_rag.kernels.pdl as pdl  # noqa: E402
import gsa_rag.kernels.sparse_decode as sparse_decode  # noqa: E402


def test_pdl_runs_only_on_hopper_class_cuda_outside_the_interpreter(monkeypatch):
    assert pdl.pdl_launch(torch.device("cpu")) == {"PDL": False}
    if pdl.gdc_wait is None:
        pytest.skip("this Triton has no griddepcontrol (PDL came in Triton 3.4)")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(pdl, "interpreting", lambda: False)
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    assert pdl.pdl_launch(cuda) == {"PDL": True, "launch_pdl": True}
    assert pdl.pdl_launch(cuda, when=False) == {"PDL": False}  # a grid that must spread over every SM
    with pdl.plain_launches():
        assert pdl.pdl_launch(cuda) == {"PDL": False}
    assert pdl.pdl_launch(cuda)["PDL"]  # restored on leaving
    with pytest.raises(RuntimeError), pdl.plain_launches():
        raise RuntimeError("a benchmark fails inside")
    assert pdl.ENABLED  # restored on an error too
    monkeypatch.setattr(pdl, "_capable", lambda index: False)  # Ampere and older: no griddepcontrol
    assert pdl.pdl_launch(cuda) == {"PDL": False}
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    monkeypatch.setattr(pdl, "interpreting", lambda: True)
    assert pdl.pdl_launch(cuda) == {"PDL": False}


def _launched_with_pdl(module) -> set[str]:
    """Names of the kernels `module` launches as NAME[grid](..., **pdl_launch(device), ...)."""
    names = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            spread = [kw.value for kw in node.keywords if kw.arg is None]
            if any(isinstance(v, ast.Call) and getattr(v.func, "id", "") == "pdl_launch" for v in spread):
                names.add(node.func.value.id)
    return names


def _kernels_with_pdl_parameter(module) -> dict[str, ast.FunctionDef]:
    found = {}
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.FunctionDef) and any(a.arg == "PDL" for a in node.args.args):
            found[node.name] = node
    return found


@pytest.mark.parametrize("module", [gist_select, sparse_decode, hier_select], ids=lambda m: m.__name__.split(".")[-1])
def test_every_kernel_launched_with_pdl_waits_before_anything_else(module):
    launched = _launched_with_pdl(module)
    kernels = _kernels_with_pdl_parameter(module)
    assert launched, "no launch passes **pdl_launch(...)"
    assert launched == set(kernels), "a kernel with a PDL parameter is launched without it, or the reverse"
    for name, fn in kernels.items():
        first = fn.body[0]  # comments are not statements; a docstring would be
        assert (isinstance(first, ast.Expr) and isinstance(first.value, ast.Call)
                and first.value.func.id == "wait_for_previous"
                and [a.id for a in first.value.args] == ["PDL"]), f"{name} does not start with wait_for_previous(PDL)"


# compiled in a child process: this suite runs Triton's interpreter (TRITON_INTERPRET=1), whose
# kernels are not compilable objects
_COMPILE_UNION_KERNEL = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gsa_rag.kernels import gist_select

kernel = gist_select._union_kernel
values = {"BLOCK": 512, "ENDS_MODE": gist_select.ENDS_BLOCKS, "BLOCK_C": 64, "PDL": sys.argv[1] == "1"}
types = {"SEL": "*i8", "PTR": "*i32", "SIZES": "*i32", "ENDS": "*i32"}
signature = {n: "constexpr" if n in values else types.get(n, "i32") for n in kernel.arg_names}
source = ASTSource(fn=kernel, signature=signature,
                   constexprs={(kernel.arg_names.index(n),): v for n, v in values.items()})
print(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"])
"""


def test_the_wait_compiles_ahead_of_every_memory_access_for_sm90():
    if pdl.gdc_wait is None:
        pytest.skip("this Triton has no griddepcontrol (PDL came in Triton 3.4)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ptx = {}
    for on in (True, False):
        done = subprocess.run([sys.executable, "-c", _COMPILE_UNION_KERNEL, str(int(on))], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        ptx[on] = done.stdout
    lines = ptx[True].splitlines()
    wait = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    release = [i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line]
    memory = [i for i, line in enumerate(lines) if any(op in line for op in ("ld.global", "st.global", "atom."))]
    assert wait and release and memory
    assert wait[0] < release[0] < memory[0]
    assert "griddepcontrol" not in ptx[False] and "st.global" in ptx[False]
