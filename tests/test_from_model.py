"""GistEngine.from_model: a model the user loaded themselves runs as from_pretrained's does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from gsa_rag import GistConfig, GistEngine
from gsa_rag.errors import UnsupportedModelError
from gsa_rag.models import prepare_model

QUESTION = "When was the Vasa raised?"
PASSAGES = ["The Vasa sank in 1628 on its maiden voyage in Stockholm.",
            "The ship was raised in 1961 and is now in the Vasa Museum."]


def _plain(default_model_dir):
    """The default model as a user loads it with transformers: SDPA, no gist tokens."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model, tokenizer


def test_from_model_answers_as_from_pretrained(default_model_dir):
    for adapter in (None, "default"):
        want = GistEngine.from_pretrained(device="cpu", adapter=adapter)
        got = GistEngine.from_model(*_plain(default_model_dir), adapter=adapter)
        assert got.config == want.config and (got.adapter is None) == (adapter is None)
        assert got.generate(QUESTION, PASSAGES, max_new_tokens=8) == want.generate(QUESTION, PASSAGES, max_new_tokens=8)


@torch.no_grad()
def test_a_prepared_model_still_answers_as_before_outside_gsa_rag(default_model_dir):
    model, tokenizer = _plain(default_model_dir)
    ids = tokenizer("The capital of Sweden is", return_tensors="pt").input_ids
    before = model(ids).logits
    prepare_model(model, tokenizer, GistConfig())
    assert model.config._attn_implementation == "gsa" and "<gist>" in tokenizer.get_vocab()
    assert not model.training
    # SDPA's kernels against GSA's plain causal path: float32 rounding only (3e-5 seen with torch 2.11)
    torch.testing.assert_close(model(ids).logits[..., : before.shape[-1]], before, rtol=1e-4, atol=1e-4)
    engine = GistEngine.from_model(model, tokenizer)  # prepared twice: nothing changes
    assert engine.model is model and len(tokenizer) == model.get_input_embeddings().weight.shape[0]


def test_from_model_refuses_what_from_pretrained_refuses(default_model_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tokenizer)))
    with pytest.raises(UnsupportedModelError, match="RoPE"):
        GistEngine.from_model(gpt2, tokenizer)
    # an adapter trained on another base
    tiny = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=2, num_key_value_heads=1,
                                                        vocab_size=len(tokenizer)))
    with pytest.raises(ValueError, match="trained on base model"):
        GistEngine.from_model(tiny, tokenizer, adapter="default")


def test_from_model_warns_for_a_layout_the_adapter_was_not_trained_with(default_model_dir):
    with pytest.warns(UserWarning, match="chunk_size=16"):
        engine = GistEngine.from_model(*_plain(default_model_dir), adapter="default", config=GistConfig(chunk_size=16))
    assert engine.config.chunk_size == 16


def test_a_model_with_its_adapter_merged_is_wrapped_again_without_it(default_model_dir):
    """The adapter's LoRA is merged into the user's model: wrapping it again keeps that adapter's
    config, and naming an adapter again is refused as already merged (not as another base)."""
    model, tokenizer = _plain(default_model_dir)
    first = GistEngine.from_model(model, tokenizer, adapter="default")
    again = GistEngine.from_model(model, tokenizer)
    assert again.config == first.config and again.adapter == first.adapter
    assert again.generate(QUESTION, PASSAGES, max_new_tokens=6) == first.generate(QUESTION, PASSAGES, max_new_tokens=6)
    with pytest.raises(ValueError, match="already has the adapter"):
        GistEngine.from_model(model, tokenizer, adapter="default")
