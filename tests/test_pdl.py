"""Programmatic dependent launch (gsa_rag.kernels.pdl): when it is asked for, and that every
kernel launched with it waits for the previous kernel before it touches memory.

The kernels' results under PDL are the GPU suite's (every kernel test on CUDA launches with it);
here, on the CPU: the launch switch and its per-grid choices, the source rule that makes PDL safe,
the compiled form of that rule for sm_90 (Triton compiles for Hopper without a GPU), and the
kernels on a Triton without PDL."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton not installed (the kernels under test are Triton's)")

import gsa_rag.kernels as kernels_package
from gsa_rag.kernels import gist_select, pdl, sparse_decode, window_select
from gsa_rag.kernels.gist_keys8 import quantize_gist_keys
from test_kernels_gist_keys8 import DEVICE, random_keys

NO_PDL = "this Triton has no griddepcontrol (PDL came in Triton 3.4)"
# kernel modules that launch through pdl_launch, found by their text: a new one is covered too
PDL_MODULES = sorted(p.stem for p in pathlib.Path(kernels_package.__file__).parent.glob("*.py")
                     if p.stem != "pdl" and "pdl_launch(" in p.read_text())
# the child processes below compile or import afresh, outside this suite's interpreter
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_pdl_runs_only_on_hopper_class_nvidia_gpus_outside_the_interpreter(monkeypatch):
    assert pdl.pdl_launch(torch.device("cpu")) == {"PDL": False}
    if pdl.gdc_wait is None:
        pytest.skip(NO_PDL)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(pdl, "interpreting", lambda: False)
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert pdl.pdl_launch(cuda) == {"PDL": True, "launch_pdl": True}
    assert pdl.pdl_launch(cuda, allow=False) == {"PDL": False}  # a grid that must spread over every SM
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert pdl.pdl_launch(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}  # no index: the current one
    with pdl.plain_launches():
        assert pdl.pdl_launch(cuda) == {"PDL": False}
    assert pdl.pdl_launch(cuda)["PDL"]  # restored on leaving
    with pytest.raises(RuntimeError), pdl.plain_launches():
        raise RuntimeError("a benchmark fails inside")
    assert pdl.ENABLED  # restored on an error too
    monkeypatch.setattr(pdl, "_capable", lambda index: False)  # Ampere and older: no griddepcontrol
    assert pdl.pdl_launch(cuda) == {"PDL": False}
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm devices say "cuda" too
    assert pdl.pdl_launch(cuda) == {"PDL": False}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(pdl, "interpreting", lambda: True)
    assert pdl.pdl_launch(cuda) == {"PDL": False}


@pytest.mark.parametrize(("value", "enabled"), [(None, True), ("1", True), ("0", False), ("off", False), ("False", False)])
def test_gsa_rag_pdl_turns_it_off(value, enabled):
    env = {k: v for k, v in CHILD_ENV.items() if k != "GSA_RAG_PDL"}
    if value is not None:
        env["GSA_RAG_PDL"] = value
    done = subprocess.run([sys.executable, "-c", "from gsa_rag.kernels import pdl; print(pdl.ENABLED)"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == str(enabled), done.stderr[-2000:]


def test_grids_that_must_spread_over_every_sm_launch_plainly(monkeypatch):
    """The int8 scores kernel's one-wave grid, a combine with more programs than SMs and the window
    select are launched without PDL (allow=False); smaller grids and the other kernels with it."""
    allowed = []

    def record(device, allow=True):
        allowed.append(allow)
        return {"PDL": False}

    for module in (gist_select, sparse_decode):
        monkeypatch.setattr(module, "pdl_launch", record)
    monkeypatch.setattr(gist_select, "num_sms", lambda device: 1)
    monkeypatch.setattr(gist_select, "INT8_BLOCK_C", 32)
    g = torch.Generator().manual_seed(0)
    key, gist_index, num_chunks, gist_valid = random_keys(2, 2, 300, 16, 100, g)  # 4 blocks a row, 16 in all
    query = torch.randn(2, 4, 16, generator=g)
    key, gist_index, num_chunks, gist_valid, query = (x.to(DEVICE) for x in (key, gist_index, num_chunks, gist_valid,
                                                                             query))
    keys8 = quantize_gist_keys(key, gist_index, gist_valid)

    def scores(int8, **settings):
        for name, value in settings.items():
            monkeypatch.setattr(gist_select, name, value)
        allowed.clear()
        gist_select._scores_launch(query, key, gist_index, num_chunks, keys8=keys8 if int8 else None)
        return allowed

    assert scores(int8=True, INT8_PERSISTENT=True, STEPS_MIN_PROGRAMS_PER_SM=8) == [False]  # one wave
    assert scores(int8=True, INT8_PERSISTENT=True, STEPS_MIN_PROGRAMS_PER_SM=32) == [True]  # few: a block each
    assert scores(int8=True, INT8_PERSISTENT=False, STEPS_MIN_PROGRAMS_PER_SM=8) == [True]  # steps, many waves
    assert scores(int8=False, SCORE_PERSISTENT=False, STEPS_MIN_PROGRAMS_PER_SM=8) == [True]

    monkeypatch.setattr(sparse_decode, "num_sms", lambda device: 4)
    for B, Hq, R, want in ((1, 4, 1, True), (1, 5, 1, False), (1, 2, 40, False)):
        allowed.clear()
        m, l = torch.randn(B, Hq, R, 3, generator=g), torch.rand(B, Hq, R, 3, generator=g) + 0.5
        acc = torch.randn(B, Hq, R, 3, 8, generator=g)
        sparse_decode.combine_splits(m.to(DEVICE), l.to(DEVICE), acc.to(DEVICE), torch.empty(B, Hq, R, 8, device=DEVICE))
        assert allowed == [want], (B, Hq, R)

    # the window select's rows in about one program an SM, then the union kernel with PDL
    monkeypatch.setattr(window_select, "pdl_launch", record)
    allowed.clear()
    scores = torch.randn(1, 2, 40, generator=g).to(DEVICE)
    out = torch.empty(2, device=DEVICE)
    window_select.window_select_launch(scores, torch.tensor([3], device=DEVICE),
                                       gist_select.select_counters(1, 2, DEVICE).zero_(), out, out.int())
    assert allowed == [False]


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


def test_the_kernel_modules_that_launch_with_pdl_are_found():
    assert {"gist_select", "hier_select", "sparse_decode"} <= set(PDL_MODULES)


@pytest.mark.parametrize("name", PDL_MODULES)
def test_every_kernel_launched_with_pdl_waits_before_anything_else(name):
    module = importlib.import_module(f"gsa_rag.kernels.{name}")
    launched = _launched_with_pdl(module)
    kernels = _kernels_with_pdl_parameter(module)
    assert launched, "no launch passes **pdl_launch(...)"
    assert launched == set(kernels), "a kernel with a PDL parameter is launched without it, or the reverse"
    for kernel, fn in kernels.items():
        first = fn.body[0]  # comments are not statements; a docstring would be
        assert (isinstance(first, ast.Expr) and isinstance(first.value, ast.Call)
                and first.value.func.id == "wait_for_previous"
                and [a.id for a in first.value.args] == ["PDL"]), f"{kernel} does not start with wait_for_previous(PDL)"


# compiled in a child process: this suite runs Triton's interpreter (TRITON_INTERPRET=1), whose
# kernels are not compilable objects. Per kernel: its module, pointer types, constexprs, stages
_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gsa_rag.kernels import gist_select, sparse_decode, window_select

cases = {
    "_union_kernel": (gist_select, {"SEL": "*fp32", "THR": "*fp32", "CUT": "*i32", "PTR": "*i32", "SIZES": "*i32",
                                    "ENDS": "*i32"},
                      {"BLOCK": 512, "ENDS_MODE": gist_select.ENDS_BLOCKS, "BLOCK_C": 64, "FROM_SCORES": True}, 1),
    "_window_select_kernel": (window_select, {"S": "*fp32", "KROW": "*i64", "CNT": "*i32", "CAND": "*fp32",
                                              "THR": "*fp32", "CUT": "*i32", "PATH": "*i32"},
                              {"PART": 1024, "SAMPLE": 1024, "CAP": 512, "TILE": 512, "MARGIN": 4.0, "WORDS": 4,
                               "STATS": False}, 1),
    "_split_kernel": (sparse_decode, {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "IDX": "*i32", "LEN": "*i32",
                                      "M": "*fp32", "L": "*fp32", "ACC": "*fp32", "qk_scale": "fp32"},
                      {"G_PAD": 16, "D": 128, "BLOCK_N": 64, "DOT_F32": False, "PRECISION": "tf32"}, 3),
    "_combine_kernel": (sparse_decode, {"M": "*fp32", "L": "*fp32", "ACC": "*fp32", "O": "*bf16"},
                        {"S_PAD": 64, "D": 128, "BLOCK_S": 16, "BLOCK_R": 1}, 1),
}
module, types, constants, stages = cases[sys.argv[1]]
kernel = getattr(module, sys.argv[1])
ptx = {}
for on in (True, False):
    values = {**constants, "PDL": on}
    signature = {n: "constexpr" if n in values else types.get(n, "i32") for n in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(n),): v for n, v in values.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
    ptx[str(on)] = compiled.asm["ptx"]
print(json.dumps(ptx))
"""
# global memory (loads, stores, atomics and reductions, asynchronous copies, TMA)
MEMORY_OPS = ("ld.global", "st.global", "atom.", "red.", "cp.async", "cp.reduce.async")


@pytest.mark.parametrize("kernel", ["_union_kernel", "_window_select_kernel", "_split_kernel", "_combine_kernel"])
def test_the_wait_compiles_ahead_of_every_memory_access_for_sm90(kernel):
    if pdl.gdc_wait is None:
        pytest.skip(NO_PDL)
    done = subprocess.run([sys.executable, "-c", _COMPILE, kernel], env=CHILD_ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    ptx = json.loads(done.stdout)
    lines = ptx["True"].splitlines()
    wait = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    release = [i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line]
    memory = [i for i, line in enumerate(lines) if any(op in line for op in MEMORY_OPS)]
    assert wait and release and memory
    assert wait[0] < release[0] < memory[0]
    assert "griddepcontrol" not in ptx["False"] and any(op in ptx["False"] for op in MEMORY_OPS)


_WITHOUT_GDC = """
import sys, types
import torch
import triton.language.extra.cuda
sys.modules["triton.language.extra.cuda"] = types.ModuleType("triton.language.extra.cuda")  # Triton 3.3: none
from gsa_rag.kernels import dispatch, gist_select, hier_select, pdl, sparse_decode
dispatch._interpreter_compat()  # run-time loop bounds under Triton 3.6's interpreter with NumPy >= 2.3
assert pdl.gdc_wait is None and pdl.triton is not None
assert None not in (gist_select.triton, hier_select.triton, sparse_decode.triton), "a kernel module lost Triton"
g = torch.Generator().manual_seed(0)
q = torch.randn(1, 4, 16, generator=g)
k, v = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
index = torch.randint(0, 40, (1, 2, 24), generator=g, dtype=torch.int32)
lengths = torch.tensor([[24, 17]], dtype=torch.int32)
got = sparse_decode.sparse_decode_triton(q, k, v, index, lengths)
want = sparse_decode.sparse_decode_ref(q, k, v, index, lengths)
assert float((got - want).abs().max()) < 1e-4
print("ok")
"""


def test_the_kernels_run_on_a_triton_without_pdl():
    """pyproject allows Triton releases from before griddepcontrol: the modules keep their kernels
    (launched plainly) instead of losing Triton to the failed import."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_GDC], env={**CHILD_ENV, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
