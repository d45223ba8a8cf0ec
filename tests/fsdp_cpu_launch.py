"""`python -m torch.distributed.run ... tests/fsdp_cpu_launch.py train ...`: the gsa-rag CLI with
accelerate's FSDP allowed on CPU processes, for the 2-process gloo test (tests/test_train_reuse.py).

accelerate (1.15) turns FSDP on only for accelerator devices (CUDA, XPU, ...): on CPU processes
it silently runs DDP (its state module lists the distributed types FSDP may replace, and
MULTI_CPU is not among them). torch's FSDP2 (`fully_shard`) itself runs on CPU with gloo, so
this launcher makes the one change accelerate withholds: when the FSDP plugin is configured
(ACCELERATE_USE_FSDP=true, as `accelerate launch --config_file examples/accelerate_fsdp2.yaml`
sets it), a MULTI_CPU state becomes FSDP. Everything after that is accelerate's and gsa-rag's
ordinary FSDP2 path.
"""

import sys

from accelerate import state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _init_allowing_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # both shared states: AcceleratorState copies PartialState's on every construction
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


state.AcceleratorState.__init__ = _init_allowing_cpu_fsdp

if __name__ == "__main__":
    from gsa_rag.cli import main

    main(sys.argv[1:])
