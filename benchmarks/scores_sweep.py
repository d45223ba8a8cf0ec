"""The gist scores kernel (`gsa_rag.kernels.gist_select._scores_launch`) over its launch settings,
reading the 16-bit key cache or the int8 copy of `GistConfig(score_dtype="int8")`: the sweep that
chose INT8_BLOCK_C, INT8_STEPS, INT8_WARPS and INT8_STAGES (issue #6, NOTES.md round 17), and
INT8_PERSISTENT with INT8_PROGRAMS_PER_SM (round 22).

    python benchmarks/scores_sweep.py [--quick] [--out benchmarks/results/kernels/h200_round22/scores_sweep.json]

Llama-3-8B shapes (32 query / 8 KV heads, d 128), bf16, the benchmarks' synthetic layout (chunk
8), CUDA-graph replay rotating over input sets of >= 256 MB (no L2 hits), at 128K batch 8, 128K
batch 1 and 32K batch 8. Every int8 setting's scores are checked against the default's first.
Swept for the int8 copy: chunks a block (64, 128, 256), warps (4, 8), pipeline stages (2, 3), and
either blocks a program (1, 2, 4, 8) or one wave of 2-6 programs an SM, each a contiguous stretch
of blocks (`--quick`: blocks of 128 and 256, 4 warps, 3 stages); for the cache: blocks a program
(1, 2) or one wave of 2-8 programs an SM. Microseconds per launch
(median); the floor is the bytes read and written at 4.3 TB/s (int8 keys, channel scales, fp32
scores).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from gsa_rag.kernels import gist_select as gs
from gsa_rag.kernels.bench import bench_us, input_copies, synthetic_layout
from gsa_rag.kernels.gist_keys8 import quantize_gist_keys

CASES = ((131072, 8), (131072, 1), (32768, 8))
HQ, HKV, D = 32, 8, 128
COPY_BW = 4.3e12
LAUNCH = ("INT8_BLOCK_C", "INT8_STEPS", "INT8_WARPS", "INT8_STAGES", "SCORE_STEPS", "INT8_PERSISTENT",
          "INT8_PROGRAMS_PER_SM", "SCORE_PERSISTENT", "SCORE_PROGRAMS_PER_SM")
# the cache's settings: blocks a program, or one wave of n programs an SM
CACHE_SETTINGS = ([{"SCORE_PERSISTENT": False, "SCORE_STEPS": steps} for steps in (1, 2)]
                  + [{"SCORE_PERSISTENT": True, "SCORE_PROGRAMS_PER_SM": n} for n in (2, 4, 6, 8)])


def int8_settings(quick: bool) -> list[dict]:
    """The int8 launch settings swept, each a {gist_select constant: value} dict."""
    grid = itertools.product((128, 256), (4,), (3,)) if quick else itertools.product((64, 128, 256), (4, 8), (2, 3))
    settings = []
    for block, warps, stages in grid:
        common = {"INT8_BLOCK_C": block, "INT8_WARPS": warps, "INT8_STAGES": stages}
        settings += [{**common, "INT8_PERSISTENT": False, "INT8_STEPS": steps} for steps in (1, 2, 4, 8)]
        settings += [{**common, "INT8_PERSISTENT": True, "INT8_PROGRAMS_PER_SM": n} for n in (2, 3, 4, 6)]
    return settings


def cache_setting_name(setting: dict) -> str:
    if setting["SCORE_PERSISTENT"]:
        return f"cache persistent {setting['SCORE_PROGRAMS_PER_SM']} an SM"
    return f"cache steps {setting['SCORE_STEPS']}"


def setting_name(setting: dict) -> str:
    how = (f"persistent {setting['INT8_PROGRAMS_PER_SM']} an SM" if setting["INT8_PERSISTENT"]
           else f"steps {setting['INT8_STEPS']}")
    return f"int8 block {setting['INT8_BLOCK_C']} {how} warps {setting['INT8_WARPS']} stages {setting['INT8_STAGES']}"


def sweep_case(L: int, B: int, settings: list[dict]) -> dict:
    layout = synthetic_layout(B, L, 8, sink=4, tail=32, device="cuda")
    T, C = layout.seq_len, layout.gist_index.shape[1]
    copies = input_copies(B * HKV * T * D * 2 * 2)
    sets = []
    for _ in range(copies):
        q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.bfloat16)
        sets.append((q, k, quantize_gist_keys(k, layout.gist_index, layout.gist_valid)))

    def launch(q, k, keys8=None):
        return gs._scores_launch(q, k, layout.gist_index, layout.num_chunks, keys8=keys8)

    def us(int8: bool) -> float:
        return bench_us(lambda: [launch(q, k, k8 if int8 else None) for q, k, k8 in sets], cuda_graph=True) / copies

    finite = torch.isfinite(launch(*sets[0]))
    times = {}
    want = launch(*sets[0][:2]).clone()
    cache_defaults = {name: getattr(gs, name) for setting in CACHE_SETTINGS for name in setting}
    for setting in CACHE_SETTINGS:
        for name, value in setting.items():
            setattr(gs, name, value)
        got = launch(*sets[0][:2])
        if not (torch.equal(finite, torch.isfinite(got)) and torch.equal(got[finite], want[finite])):
            raise AssertionError(f"cache scores differ under {cache_setting_name(setting)}")
        times[cache_setting_name(setting)] = us(False)
    for name, value in cache_defaults.items():
        setattr(gs, name, value)
    want8 = launch(*sets[0]).clone()  # the default launch, against which every setting is checked
    for setting in settings:
        for name, value in setting.items():
            setattr(gs, name, value)
        got = launch(*sets[0])
        # the same products: only the order of the fp32 sums may differ
        close = torch.allclose(got[finite], want8[finite], rtol=1e-5, atol=1e-4 * float(want8[finite].abs().max()))
        if not (torch.equal(finite, torch.isfinite(got)) and close):
            raise AssertionError(f"int8 scores differ under {setting_name(setting)}")
        times[setting_name(setting)] = us(True)
    floor8 = (B * HKV * C * D + B * HKV * D * 4 + B * HQ * C * 4) / COPY_BW * 1e6
    return {"context": L, "batch": B, "chunks": C, "int8_floor_us": floor8, "us": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the rows as JSON (never overwrites)")
    parser.add_argument("--quick", action="store_true", help="blocks of 128 and 256, 4 warps, 3 stages only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU and Triton")
    if args.out and Path(args.out).exists():
        parser.error(f"--out {args.out} exists: results are never overwritten; name another file")
    defaults = {name: getattr(gs, name) for name in LAUNCH}
    default_int8 = setting_name(defaults)
    settings = int8_settings(args.quick)
    torch.manual_seed(0)
    rows = []
    for L, B in CASES:
        for name, value in defaults.items():  # each case's reference scores under the defaults
            setattr(gs, name, value)
        row = sweep_case(L, B, settings)
        rows.append(row)
        best = sorted(row["us"].items(), key=lambda item: item[1])
        print(f"{L // 1024}K batch {B} ({row['chunks']} chunks; int8 floor {row['int8_floor_us']:.1f} us): "
              f"default int8 {row['us'][default_int8]:.1f}, cache {row['us']['cache steps 1']:.1f}; fastest "
              + "; ".join(f"{name} {t:.1f}" for name, t in best[:4]), flush=True)
    for name, value in defaults.items():
        setattr(gs, name, value)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "x") as f:
            json.dump({"device": torch.cuda.get_device_name(), "defaults": default_int8, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
