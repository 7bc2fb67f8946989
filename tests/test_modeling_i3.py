"""I3ForCausalLM: caches, padding, saving and loading, precision, configuration errors (generation through its
clients is in test_generation.py)."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from i3.configuration_i3 import I3Config
from i3.modeling_i3 import I3Cache, I3ForCausalLM

from conftest import REPO_ROOT, hub_cache_snapshot, load_in_fresh_process, tiny_config, tiny_model, with_live_states

POSITION_TYPES = ["rope", "learned"]
MIXERS = ["i3", "open-i3", "rwkv4"]


def random_ids(batch, length, seed=0, vocab=99):
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("position_embedding_type", POSITION_TYPES)
@pytest.mark.parametrize("recurrent_mixer", MIXERS)
def test_full_forward_equals_token_by_token(recurrent_mixer, position_embedding_type):
    """Logits of one pass over 13 tokens equal feeding a 5-token prefill then single tokens through the cache."""
    model = with_live_states(tiny_model(recurrent_mixer=recurrent_mixer,
                                        position_embedding_type=position_embedding_type))
    ids = random_ids(2, 13)
    with torch.no_grad():
        expected = model(ids).logits
        cache = I3Cache(model.config)
        pieces = [model(ids[:, :5], cache=cache, use_cache=True).logits]
        for t in range(5, 13):
            pieces.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recurrent_mixer", MIXERS)
def test_prefill_in_several_chunks_equals_one_pass(recurrent_mixer):
    """Continuing a multi-token forward from the cache (chunked prefill) gives the same logits as one pass."""
    model = with_live_states(tiny_model(recurrent_mixer=recurrent_mixer))
    ids = random_ids(2, 19)
    with torch.no_grad():
        expected = model(ids).logits
        cache = I3Cache(model.config)
        first = model(ids[:, :6], cache=cache, use_cache=True).logits
        second = model(ids[:, 6:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), expected, atol=1e-4, rtol=1e-4)


def test_chunk_size_does_not_change_logits():
    """The chunk length is a speed knob only: chunks of 1, 4 and 64 give the same logits."""
    ids = random_ids(2, 21)
    logits = []
    for chunk_size in (1, 4, 64):
        with torch.no_grad():
            logits.append(tiny_model(chunk_size=chunk_size)(ids).logits)
    torch.testing.assert_close(logits[0], logits[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], logits[2], atol=1e-4, rtol=1e-4)


def test_padding_does_not_touch_recurrent_states():
    """After a left-padded prefill, every recurrent state equals the state of the unpadded prompt."""
    model = tiny_model()
    prompt = random_ids(1, 6)
    padded = torch.cat([torch.full((1, 5), model.config.pad_token_id), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 6)], dim=1).long()
    alone, batched = I3Cache(model.config), I3Cache(model.config)
    with torch.no_grad():
        model(prompt, cache=alone, use_cache=True)
        model(padded, attention_mask=mask, cache=batched, use_cache=True)
    for layer_idx, layer_type in enumerate(model.config.layer_types):
        if layer_type != "linear_attention":
            continue
        expected = alone.recurrent_states(layer_idx).states
        assert sorted(expected) == ["conv", "shift", "ssm"]
        for name, state in batched.recurrent_states(layer_idx).states.items():
            torch.testing.assert_close(state, expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_labels_give_the_shifted_cross_entropy():
    """`labels` are shifted inside and -100 is ignored: the loss equals cross-entropy of logits[t] vs ids[t+1]."""
    model = tiny_model()
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[0, 4:7] = -100
    out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 99), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputing activations in the backward pass changes no gradient."""
    ids = random_ids(2, 11)
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_run_without_autocast(dtype):
    """bf16 / fp16 weights run forward, backward and cached generation, close to the float32 logits."""
    model = tiny_model()
    ids = random_ids(2, 9)
    with torch.no_grad():
        reference = model(ids).logits
    half = tiny_model().to(dtype)
    out = half(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits.float(), reference, atol=0.1, rtol=0.05)
    generated = half.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert generated.shape == (2, 14)


def test_learned_positions_refuse_too_long_inputs():
    """Past `max_position_embeddings` learned positions raise a clear error instead of indexing garbage."""
    model = tiny_model(position_embedding_type="learned", max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(random_ids(1, 17))


def test_meta_device_load_reinitialises_custom_parameters(tmp_path):
    """A checkpoint missing A_log / dt_bias / D loads with them initialised as docs/design.md#the-i3-mixer says, not
    left empty."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    dropped = [key for key in weights if key.endswith(("A_log", "dt_bias", ".D"))]
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = I3ForCausalLM.from_pretrained(tmp_path)
    mixer = loaded.model.layers[0].linear_attn
    assert torch.all((mixer.A_log.exp() >= 1) & (mixer.A_log.exp() <= 16))
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert torch.all((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001))
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_save_and_load_in_a_fresh_process(tmp_path):
    """A saved folder (weights, config with auto_map, code) loads anywhere with identical logits."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "saved")
    saved = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert {"config.json", "model.safetensors", "modeling_i3.py", "configuration_i3.py"} <= set(saved)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    ids = random_ids(2, 12)
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.equal(load_in_fresh_process(tmp_path, tmp_path / "saved", ids), expected)


def test_load_by_repo_id_from_a_hub_cache(tmp_path):
    """Laid out as a Hub download (models--org--name/snapshots/<rev>), the model loads by repo id offline."""
    model = tiny_model(seed=5)
    model.save_pretrained(hub_cache_snapshot(tmp_path / "hub", "i3-org/i3-tiny"))
    ids = random_ids(1, 9)
    with torch.no_grad():
        expected = model(ids).logits
    logits = load_in_fresh_process(tmp_path, "i3-org/i3-tiny", ids)
    assert torch.equal(logits, expected)


def test_root_config_is_the_i3_80m_layout():
    """The repo's config.json loads through AutoConfig as the i3-80M layout with the i3 mixer."""
    config = AutoConfig.from_pretrained(REPO_ROOT, trust_remote_code=True)
    assert config.model_type == "i3" and config.recurrent_mixer == "i3"
    assert config.layer_types == ["linear_attention"] * 10 + ["full_attention"] * 6
    assert (config.hidden_size, config.num_attention_heads, config.state_size, config.conv_kernel) == (512, 16, 32, 2)
    assert config.vocab_size == 35560 and config.position_embedding_type == "rope"
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    assert type(model).__name__ == "I3ForCausalLM"


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_attention_heads=5), "num_attention_heads"),
        (dict(layer_types=["linear_attention", "cross_attention"]), "layer_types"),
        (dict(layer_types=[]), "layer_types"),
        (dict(recurrent_mixer="lstm"), "recurrent_mixer"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(state_size=-1), "state_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(recurrent_num_heads=3), "recurrent_num_heads"),
        (dict(position_embedding_type="alibi"), "position_embedding_type"),
        (dict(conv_kernel=1), "conv_kernel"),
        (dict(num_hidden_layers=3), "num_hidden_layers"),
        (dict(time_step_min=0.5, time_step_max=0.1), "time_step_min"),
        (dict(low_rank=0), "low_rank"),
    ],
)
def test_bad_configs_name_the_field(overrides, field):
    """Every inconsistent value raises a ValueError whose message names the offending field."""
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_round_trips():
    """A saved config loads back field for field."""
    config = tiny_config(position_embedding_type="learned", low_rank=4)
    assert I3Config.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_eager_attention_equals_sdpa_and_records_outputs():
    """The eager attention path gives sdpa's logits on a padded batch, and records attentions and hidden states."""
    model = tiny_model()
    ids = random_ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        sdpa = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(eager.logits[1], sdpa[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager.logits[0, 3:], sdpa[0, 3:], atol=1e-5, rtol=1e-5)
    assert len(eager.hidden_states) == 1 + model.config.num_hidden_layers
    assert [a.shape for a in eager.attentions] == [(2, 4, 9, 9)] * 2  # the two attention layers
    torch.testing.assert_close(eager.attentions[0].sum(-1)[1], torch.ones(4, 9))

@pytest.mark.parametrize("version, warns", [("5.23.0", True), ("5.24.0", False), ("5.25.3", False), ("5.26.0", True)])
def test_transformers_outside_the_tested_range_warns_with_the_range(monkeypatch, version, warns):
    """Loading i3 under a transformers release outside the tested range warns and names the range; inside, no word."""
    from i3 import configuration_i3

    messages = []
    monkeypatch.setattr(configuration_i3.transformers, "__version__", version)
    monkeypatch.setattr(configuration_i3.logger, "warning_once", messages.append)
    configuration_i3.warn_if_untested_transformers()
    assert bool(messages) == warns
    if warns:
        oldest, newest = configuration_i3.TESTED_TRANSFORMERS
        assert oldest in messages[0] and newest in messages[0] and version in messages[0]


def test_no_module_can_be_swapped_for_a_hub_kernel():
    """transformers' activation modules carry hooks that `from_pretrained(use_kernels=True)` (the default from 5.25,
    wherever `kernels` is installed) replaces with downloaded kernels; i3 uses none of them, so nothing changes its
    numerics unasked."""
    import transformers.activations

    activation_classes = tuple(cls for cls in vars(transformers.activations).values()
                               if isinstance(cls, type) and issubclass(cls, torch.nn.Module))
    for mixer in MIXERS:
        model = tiny_model(recurrent_mixer=mixer, gated_mlp=mixer == "i3")
        assert not [name for name, module in model.named_modules() if isinstance(module, activation_classes)]


def test_the_tested_range_is_the_one_requirements_allow():
    """The tested-range warning names the range requirements.txt installs: its floor, and its bound below the next
    minor release after the newest tested one."""
    from i3 import configuration_i3

    oldest, newest = configuration_i3.TESTED_TRANSFORMERS
    major, minor = (int(part) for part in newest.split("."))
    requirements = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    assert f"transformers>={oldest},<{major}.{minor + 1}" in requirements


def test_gated_feed_forward_is_llamas_swiglu():
    """`gated_mlp` with SiLU is transformers' LlamaMLP, weight for weight; at 2/3 of the plain width it has the plain
    feed-forward's parameters."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from i3.modeling_i3 import I3MLP

    config = tiny_config(gated_mlp=True, hidden_act="silu", intermediate_size=48)
    ours = I3MLP(config)
    llama = LlamaMLP(LlamaConfig(hidden_size=config.hidden_size, intermediate_size=48, hidden_act="silu"))
    llama.load_state_dict(ours.state_dict())
    hidden = torch.randn(2, 5, config.hidden_size)
    torch.testing.assert_close(ours(hidden), llama(hidden))
    plain = I3MLP(tiny_config(intermediate_size=72))
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in ours.parameters())
