"""With no gists, GSA is the unmodified Hugging Face model: logits allclose, greedy text identical."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from gsa_rag.config import GistConfig
from gsa_rag.engine import GistEngine
from gsa_rag.generation import forward
from gsa_rag.models import add_gist_tokens, load_model

QUESTIONS = ["Who raised the ship?", "When did the museum open its doors to the public?"]
PASSAGES = [
    [{"title": "Vasa", "text": "The warship Vasa sank in 1628 and was raised in 1961."}, "Stockholm is a city."],
    ["The Vasa Museum opened in 1990 on Djurgarden.", "It shows a ship.", "A third passage."],
]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2}
CONFIGS = {
    "llama": lambda v: LlamaConfig(vocab_size=v, **TINY),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, **TINY),
    "mistral": lambda v: MistralConfig(vocab_size=v, sliding_window=None, **TINY),
    "qwen3": lambda v: Qwen3Config(vocab_size=v, **TINY),  # q_norm / k_norm
    # beyond the four families the project set out to serve, through transformers' attention interface
    # too: scaled embeddings (Gemma), fused qkv (Phi-3), partial RoPE (GPT-NeoX, Phi: gist memory
    # refuses those), q/k norms over all heads (OLMo 2), an attention multiplier for the scale (Granite)
    "gemma": lambda v: transformers.GemmaConfig(vocab_size=v, head_dim=16, **TINY),
    "phi3": lambda v: transformers.Phi3Config(vocab_size=v, **TINY),
    "gpt_neox": lambda v: transformers.GPTNeoXConfig(vocab_size=v, hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=3, num_attention_heads=4),
    "phi": lambda v: transformers.PhiConfig(vocab_size=v, **TINY),
    "olmo2": lambda v: transformers.Olmo2Config(vocab_size=v, **TINY),
    "granite": lambda v: transformers.GraniteConfig(vocab_size=v, attention_multiplier=0.2, **TINY),
}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)


def tiny_pair(make_config, tokenizer):
    """(gsa model, reference sdpa model) with the same random weights and gist tokens added."""
    torch.manual_seed(0)
    # one config each: from_config writes the attention implementation into the config it is given,
    # so a shared one would make the reference run "gsa" too (found by helper-40)
    ref = AutoModelForCausalLM.from_config(make_config(len(tokenizer)), attn_implementation="sdpa").eval()
    import gsa_rag.attention  # noqa: F401

    gsa = AutoModelForCausalLM.from_config(make_config(len(tokenizer)), attn_implementation="gsa").eval()
    assert ref.config._attn_implementation == "sdpa" and gsa.config._attn_implementation == "gsa"
    add_gist_tokens(ref, tokenizer, GistConfig())
    add_gist_tokens(gsa, tokenizer, GistConfig())
    gsa.load_state_dict(ref.state_dict())
    return gsa, ref


def assert_matches_reference(engine, ref, questions, passages, max_new_tokens=8):
    config = engine.config
    layout = engine.layout(questions, passages)
    assert not layout.is_gist.any()
    with torch.no_grad():
        out, _ = forward(engine.model, layout, layout.seq_len, _cache(), config)
        for b in range(layout.batch_size):
            ids = layout.input_ids[b, layout.valid[b]][None]
            want = ref(ids).logits[0]
            got = out.logits[b, layout.valid[b]]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    answers = engine.generate(questions, passages, max_new_tokens=max_new_tokens)
    for b, answer in enumerate(answers):
        ids = layout.input_ids[b, layout.valid[b]][None]
        greedy = ref.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            suppress_tokens=engine._banned.tolist(), pad_token_id=engine.tokenizer.pad_token_id,
        )
        # the same tokens; the engine's text of them (a character cut by the budget dropped) is tested apart
        assert answer == engine._decode_whole(greedy[0, ids.shape[1] :].tolist(), engine.stop_ids())


def _cache():
    from transformers import DynamicCache

    return DynamicCache()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_tiny_models_without_gists_equal_hf(family, tokenizer):
    gsa, ref = tiny_pair(CONFIGS[family], tokenizer)
    engine = GistEngine(gsa, tokenizer, GistConfig(chunk_size=0))
    assert_matches_reference(engine, ref, QUESTIONS, PASSAGES)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_tiny_models_answer_under_the_gist_rule(family, tokenizer):
    """With gists the same families answer: their layers hand the gist state to the attention (the
    engine refuses a model whose layers drop it, as below) and nothing they ask of it is dropped."""
    gsa, _ = tiny_pair(CONFIGS[family], tokenizer)
    engine = GistEngine(gsa, tokenizer, GistConfig(chunk_size=4, top_k=1))
    answers = engine.generate(QUESTIONS, PASSAGES, max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize(("name", "value"), [("softcap", 50.0), ("sliding_window", 4096), ("s_aux", torch.zeros(4))])
def test_attention_features_gsa_does_not_implement_are_refused(name, value):
    """Gemma 2's logit soft-capping, gpt-oss's sink logits, a sliding window: an attention layer that
    asks for one gets an error naming it, not attention computed without it."""
    from gsa_rag.attention import gsa_attention
    from gsa_rag.errors import UnsupportedModelError

    q = torch.randn(1, 4, 3, 8)
    kv = torch.randn(1, 2, 3, 8)
    with pytest.raises(UnsupportedModelError, match=f"{name}="):
        gsa_attention(torch.nn.Linear(1, 1), q, kv, kv, None, **{name: value})
    out, _ = gsa_attention(torch.nn.Linear(1, 1), q, kv, kv, None, **{name: None})  # as Qwen2 passes a window
    assert out.shape == (1, 3, 4, 8)


def test_default_model_without_gists_equals_hf(default_model_dir):
    gsa, tok = load_model(default_model_dir, device="cpu")
    ref, _ = load_model(default_model_dir, device="cpu", attn_implementation="sdpa")
    engine = GistEngine(gsa, tok, GistConfig(chunk_size=0))
    assert_matches_reference(engine, ref, QUESTIONS, PASSAGES, max_new_tokens=12)


def test_gsa_model_without_state_is_plain_causal_attention(tokenizer):
    gsa, ref = tiny_pair(CONFIGS["llama"], tokenizer)
    ids = torch.randint(0, 1000, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(gsa(ids).logits, ref(ids).logits)


def test_gsa_model_without_state_takes_a_padding_mask_as_sdpa_does(tokenizer):
    """Called by a user with a left-padded batch (model(..., attention_mask=...), HF generate):
    transformers must hand the "gsa" function SDPA's mask (it handed it none, and padded rows
    attended to the pads)."""
    gsa, ref = tiny_pair(CONFIGS["llama"], tokenizer)
    ids = torch.randint(3, 1000, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        torch.testing.assert_close(gsa(ids, attention_mask=mask).logits[:, 5:], ref(ids, attention_mask=mask).logits[:, 5:])
        kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(gsa.generate(ids, **kw), ref.generate(ids, **kw))


def test_the_engine_builds_no_attention_mask(tokenizer):
    """The engine's forwards give transformers no padding mask (the gist state holds the rule), so
    no [Tq, T] mask is built for them, not even for a question over cached KV."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from gsa_rag.memory import GistMemory

    gsa, _ = tiny_pair(CONFIGS["llama"], tokenizer)  # (imports gsa_rag.attention, which registers "gsa")
    registered, built = ALL_MASK_ATTENTION_FUNCTIONS["gsa"], []
    ALL_MASK_ATTENTION_FUNCTIONS.register("gsa", lambda *a, **k: built.append(registered(*a, **k)) or built[-1])
    try:
        engine = GistEngine(gsa, tokenizer, GistConfig(chunk_size=4, top_k=1))
        memory = GistMemory(engine, progress=False)
        ids = memory.add(PASSAGES[0])
        engine.generate(QUESTIONS[0], PASSAGES[0], max_new_tokens=3)
        engine.generate(QUESTIONS[0], ids, memory=memory, max_new_tokens=3)
    finally:
        ALL_MASK_ATTENTION_FUNCTIONS.register("gsa", registered)
    assert built and all(m is None for m in built)


def test_an_architecture_whose_layers_drop_the_gist_state_is_refused(tokenizer):
    """Nemotron's decoder layers do not pass unknown keywords to their attention (yet its class
    says it takes transformers' attention interface): gist attention never ran and the engine
    silently answered with plain causal attention. Refused at the first multi-token forward."""
    import transformers

    from gsa_rag.errors import UnsupportedModelError

    def nemotron(vocab):
        return transformers.NemotronConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2)

    gsa, _ = tiny_pair(nemotron, tokenizer)
    engine = GistEngine(gsa, tokenizer, GistConfig(chunk_size=4, top_k=1))
    with pytest.raises(UnsupportedModelError, match="NemotronForCausalLM.*gsa_state"):
        engine.generate("Who raised the ship?", ["The warship Vasa sank in 1628 and was raised in 1961."],
                        max_new_tokens=2)


def test_a_model_class_outside_the_attention_interface_is_refused_before_it_runs(tokenizer):
    """StableLM (and Falcon) pick their attention modules themselves: the class says so
    (`_supports_attention_backend` False) and the engine refuses it up front."""
    import transformers

    from gsa_rag.errors import UnsupportedModelError

    config = transformers.StableLmConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    import gsa_rag.attention  # noqa: F401  (registers "gsa")

    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="gsa").eval()
    with pytest.raises(UnsupportedModelError, match="StableLmForCausalLM.*attention interface"):
        GistEngine(model, tokenizer, GistConfig(chunk_size=4, top_k=1))


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_a_temperature_that_is_not_finite_is_refused(temperature):
    from gsa_rag.errors import InputError
    from gsa_rag.generation import SamplingParams

    with pytest.raises(InputError, match="temperature"):
        SamplingParams(max_new_tokens=4, temperature=temperature)
