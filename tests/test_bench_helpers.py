"""gsa_rag.kernels.bench's random-weight models: what benchmarks/decode_latency.py and
benchmarks/memory_ttft.py --arch time in place of downloaded checkpoints."""

import pytest
import torch

from gsa_rag.config import GistConfig
from gsa_rag.generation import forward
from gsa_rag.kernels.bench import ARCHS, random_model, synthetic_layout


def test_random_model_has_the_architecture_and_runs_a_gist_forward():
    model = random_model("smollm2-135m", layers=2, device="cpu", dtype=torch.float32, vocab_size=1000)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (2, 9, 3, 576)
    assert cfg.vocab_size == 1000 and not model.training
    again = random_model("smollm2-135m", layers=2, device="cpu", dtype=torch.float32, vocab_size=1000)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)  # seeded: every run times the same weights
    layout = synthetic_layout(2, 120, 8, device="cpu")
    with torch.no_grad():
        out, _ = forward(model, layout, layout.seq_len, None, GistConfig(chunk_size=8))
    assert out.logits.shape == (2, layout.seq_len, 1000) and bool(torch.isfinite(out.logits).all())


def test_random_model_refuses_an_unknown_architecture():
    with pytest.raises(ValueError, match="llama3-8b"):
        random_model("llama-9000", device="cpu")
    assert {"smollm2-135m", "llama3-8b"} <= set(ARCHS)
