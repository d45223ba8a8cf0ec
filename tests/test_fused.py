"""gsa_rag.fused: the model's norms, rotary and SiLU gates through fused kernels.

On the CPU the wiring runs with `torch_ops` (Liger's kernels are Triton's and need CUDA): which
modules are taken over, that the forward really goes through the fused functions, that a piece
which disagrees with the module it would replace is left alone, and that `unfuse` restores the
model. With CUDA and liger-kernel, the same model through Liger's kernels against the unfused one.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from gsa_rag import fused
from gsa_rag.errors import ConfigError
from gsa_rag.fused import FusedOps, fuse_model, torch_ops, unfuse

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 100}


def tiny(family=LlamaConfig, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family(**TINY), attn_implementation="sdpa")
    return model.to(device, dtype).eval()


def counted(ops: FusedOps, calls: dict) -> FusedOps:
    def spy(name, fn):
        def call(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)
        return call

    return FusedOps(spy("rms_norm", ops.rms_norm), spy("silu_mul", ops.silu_mul), spy("rotary", ops.rotary), ops.devices)


@pytest.mark.parametrize("family", [LlamaConfig, Qwen3Config])
def test_the_fused_model_gives_the_model_own_logits_and_unfuse_restores_it(family):
    model = tiny(family)
    modeling = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    original_rotary = modeling.apply_rotary_pos_emb
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    calls = {}
    try:
        parts = fuse_model(model, counted(torch_ops(), calls))
        norms_per_layer = 4 if family is Qwen3Config else 2  # Qwen3 also norms q and k
        assert len(parts.norms) == norms_per_layer * TINY["num_hidden_layers"] + 1
        assert len(parts.mlps) == TINY["num_hidden_layers"]
        assert parts.rotary == [type(model).__module__] and not parts.skipped
        calls.clear()
        with torch.no_grad():
            got = model(ids).logits
        layers = TINY["num_hidden_layers"]
        assert calls == {"rms_norm": len(parts.norms), "silu_mul": layers, "rotary": layers}  # the forward ran them
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not fuse_model(model, torch_ops())  # fused already: nothing more to do
    finally:
        unfuse(model)
    assert modeling.apply_rotary_pos_emb is original_rotary
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_a_piece_that_disagrees_with_the_module_is_left_alone():
    """Ops whose norm is another form (Gemma's 1 + weight) and whose gate is not SiLU: the norms and
    MLPs keep their own code, the rotary (right) is fused, and the logits do not move."""
    model = tiny()
    ops = torch_ops()
    odd = FusedOps(lambda x, w, eps: ops.rms_norm(x, w + 1, eps), lambda gate, up: torch.relu(gate) * up, ops.rotary,
                   ops.devices)
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    try:
        parts = fuse_model(model, odd)
        assert not parts.norms and not parts.mlps and len(parts.rotary) == 1
        assert len(parts.skipped) == 3 * TINY["num_hidden_layers"] + 1
        assert all("differs from the module's own output" in why for why in parts.skipped)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    finally:
        unfuse(model)


def test_the_fused_rotary_hands_what_it_does_not_take_to_the_original():
    calls = []
    original = lambda q, k, cos, sin, unsqueeze_dim=1: (calls.append("original"), (q, k))[1]
    ops = torch_ops()
    spy = lambda *a: (calls.append("fused"), a[:2])[1]
    rotary = fused._fused_rotary(original, FusedOps(ops.rms_norm, ops.silu_mul, spy, devices=("cpu",)))
    q, k = torch.zeros(1, 2, 3, 8), torch.zeros(1, 1, 3, 8)
    rotary(q, k, torch.zeros(1, 3, 8), torch.zeros(1, 3, 8))
    rotary(q, k, torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))  # partial rotary
    rotary(q.transpose(1, 2), k.transpose(1, 2), torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), unsqueeze_dim=2)
    assert calls == ["fused", "original", "original"]
    on_cuda_only = fused._fused_rotary(original, FusedOps(ops.rms_norm, ops.silu_mul, spy, devices=("cuda",)))
    on_cuda_only(q, k, torch.zeros(1, 3, 8), torch.zeros(1, 3, 8))  # CPU tensors: the original
    assert calls[-1] == "original"


def test_two_models_of_one_family_share_the_fused_rotary_until_the_last_is_unfused():
    a, b = tiny(), tiny()
    modeling = __import__(type(a).__module__, fromlist=["apply_rotary_pos_emb"])
    original = modeling.apply_rotary_pos_emb
    try:
        assert fuse_model(a, torch_ops()).rotary == fuse_model(b, torch_ops()).rotary == [type(a).__module__]
        unfuse(b)
        assert modeling.apply_rotary_pos_emb is not original  # a still runs it
        assert fuse_model(b, torch_ops()).rotary == [type(a).__module__]  # b joins again
        unfuse(a)
        unfuse(b)
        assert modeling.apply_rotary_pos_emb is original
    finally:
        unfuse(a)
        unfuse(b)


def test_a_deep_copy_of_a_fused_model_computes_with_its_own_weights():
    import copy

    model = tiny()
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(5))
    try:
        fuse_model(model, torch_ops())
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin.model.norm.weight.mul_(3)
            twin.model.layers[0].mlp.up_proj.weight.mul_(2)
            fused_twin = twin(ids).logits
            unfuse(twin)
            assert not torch.allclose(fused_twin, model(ids).logits)
            torch.testing.assert_close(fused_twin, twin(ids).logits, rtol=1e-5, atol=1e-5)
    finally:
        unfuse(model)


def test_modules_whose_forward_is_replaced_already_are_left_alone():
    """An accelerate hook (device_map, offload) replaces a module's forward: fusing keeps out."""
    model = tiny()
    hooked = model.model.layers[0].input_layernorm
    hooked.forward = hooked.forward  # an instance forward, as accelerate's hooks install
    model.model.layers[1].mlp._hf_hook = object()
    try:
        parts = fuse_model(model, torch_ops())
        assert "model.layers.0.input_layernorm" not in parts.norms and "model.layers.1.mlp" not in parts.mlps
        assert sum("replaced already" in why for why in parts.skipped) == 2
    finally:
        unfuse(model)


def test_a_rotary_of_another_signature_is_left_alone():
    """GPT-J's apply_rotary_pos_emb takes (x, sin, cos): fusing says so instead of failing."""
    from transformers import GPTJConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPTJConfig(n_embd=64, n_layer=1, n_head=4, rotary_dim=16, vocab_size=100)).eval()
    parts = fuse_model(model, torch_ops())
    unfuse(model)
    assert not parts.rotary and any("does not take (q, k, cos, sin)" in why for why in parts.skipped)


def test_fused_ops_refuse_a_model_on_a_device_they_do_not_run_on():
    ops = torch_ops()
    with pytest.raises(ConfigError, match="run on cuda"):
        fuse_model(tiny(), FusedOps(ops.rms_norm, ops.silu_mul, ops.rotary, devices=("cuda",)))


def test_fusing_liger_kernels_needs_a_cuda_model():
    with pytest.raises(ConfigError, match="CUDA"):
        fuse_model(tiny())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels need CUDA")
def test_liger_kernels_give_the_unfused_logits_on_cuda():
    pytest.importorskip("liger_kernel", reason="liger-kernel not installed (pip install 'gsa-rag[fast]')")
    model = tiny(device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 100, (2, 37), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        want = model(ids).logits.float()
    try:
        parts = fuse_model(model)
        assert parts.norms and parts.mlps and parts.rotary and not parts.skipped
        with torch.no_grad():
            got = model(ids).logits.float()
    finally:
        unfuse(model)
    assert float((got - want).norm() / want.norm()) < 2e-2
