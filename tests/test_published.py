"""Published i3 checkpoints: the converter reproduces the original code's logits, the presets have the published
sizes, and anything that is not an open-i3 checkpoint is refused without writing (docs/design.md#the-family and
#fixtures)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, pipeline

from i3.configuration_i3 import I3Config
from i3.convert_open_i3 import OPEN_I3_URL, main
from i3.modeling_i3 import I3ForCausalLM, I3LowRankLinear

from conftest import FIXTURES, REPO_ROOT, load_in_fresh_process

OPEN_I3 = FIXTURES / "open-i3"
STYLES = ["80m", "200m"]


def fixture_file(style: str, suffix: str):
    return OPEN_I3 / f"open_i3_{style}_style.{suffix}"


def expected(style: str) -> dict[str, torch.Tensor]:
    """The original code's `input_ids` (2, 32) and `logits` (2, 32, 1701)."""
    return load_file(fixture_file(style, "expected.safetensors"))


def assert_original_logits(folder, style: str):
    original = expected(style)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        logits = model(original["input_ids"]).logits
    torch.testing.assert_close(logits, original["logits"], atol=1e-4, rtol=0)


def convert(checkpoint, output_dir, *flags):
    main(["--checkpoint", str(checkpoint), "--output_dir", str(output_dir), *map(str, flags)])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both fixtures converted once with their original config.json, the 80M style by running the script."""
    root = tmp_path_factory.mktemp("converted")
    script = [sys.executable, str(REPO_ROOT / "convert_open_i3.py")]
    flags = ["--checkpoint", fixture_file("80m", "pytorch_model.bin"), "--config", fixture_file("80m", "config.json"),
             "--output_dir", root / "80m"]
    subprocess.run(script + list(map(str, flags)), check=True, capture_output=True, text=True)
    convert(fixture_file("200m", "pytorch_model.bin"), root / "200m", "--config", fixture_file("200m", "config.json"))
    return root


# --- the converted fixtures run as the original code did ---


@pytest.mark.parametrize("style", STYLES)
def test_converted_fixture_gives_the_original_logits(converted, style):
    """Loaded back through AutoModelForCausalLM, a converted fixture reproduces the original logits to 1e-4."""
    assert_original_logits(converted / style, style)


def test_converted_folder_is_hub_ready(converted, tmp_path):
    """The folder has weights, config with auto_map, code, generation config and a card crediting open-i3, and loads
    in a fresh process elsewhere with the original logits."""
    folder = converted / "80m"
    files = {path.name for path in folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "configuration_i3.py",
            "modeling_i3.py"} <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_i3.I3ForCausalLM"
    assert config["layer_types"] == ["linear_attention"] * 10 + ["full_attention"] * 6
    assert (config["recurrent_mixer"], config["state_size"], config["num_attention_heads"]) == ("open-i3", 8, 4)
    assert OPEN_I3_URL in (folder / "README.md").read_text()
    original = expected("80m")
    logits = load_in_fresh_process(tmp_path, folder, original["input_ids"])
    torch.testing.assert_close(logits, original["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("style", STYLES)
def test_cached_greedy_generation_equals_uncached(converted, style):
    """24 greedy tokens decoded from the cache equal those recomputed from the whole sequence at each step."""
    model = AutoModelForCausalLM.from_pretrained(converted / style, trust_remote_code=True)
    prompt = expected(style)["input_ids"][:, :8]
    settings = dict(max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    cached, uncached = (model.generate(prompt, use_cache=use_cache, **settings) for use_cache in (True, False))
    assert torch.equal(cached, uncached)


def test_input_past_the_learned_positions_is_refused(converted):
    """33 tokens into a model with 32 learned positions raise a ValueError naming the limit: none can embed them."""
    model = AutoModelForCausalLM.from_pretrained(converted / "200m", trust_remote_code=True)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


# --- presets ---


def meta_parameter_count(config) -> int:
    """Parameters as `model.parameters()` counts them (tied tensors once), without allocating any."""
    with torch.device("meta"):
        model = I3ForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "preset, published", [("i3-80m-open", 76_861_160), ("i3-200m", 169_847_552), ("i3-ethan-base", 170_437_376)]
)
def test_preset_has_the_published_parameter_count(preset, published):
    """Loaded as the README shows, the presets of the published code have its exact parameter counts
    (docs/design.md#the-family)."""
    config = AutoConfig.from_pretrained(REPO_ROOT, subfolder=f"configs/{preset}", trust_remote_code=True)
    assert meta_parameter_count(config) == published


@pytest.mark.parametrize("vocab_size", [35_560, 41_320])
def test_i3_80m_count_is_1025_v_plus_a_constant(vocab_size):
    """The i3-80M layout has 1025 * V + 40,412,160 parameters; V = 41,320 gives the card's 82,765,160
    (docs/design.md#the-family)."""
    config = I3Config.from_pretrained(REPO_ROOT / "configs" / "i3-80m-open", vocab_size=vocab_size)
    assert meta_parameter_count(config) == 1025 * vocab_size + 40_412_160


@pytest.mark.parametrize(
    "preset, card",
    [
        ("i3-22m", dict(layers=24, hidden=512, rank=128, state=64, vocab=4466, heads=16, positions=256)),
        ("i3-12m", dict(layers=12, hidden=512, rank=128, state=64, vocab=4466, heads=16, positions=256)),
        ("i3-tiny", dict(layers=6, hidden=256, rank=8, state=16, vocab=34, heads=8, positions=128)),
    ],
)
def test_unpublished_presets_follow_their_cards(preset, card):
    """Presets of the models without public code keep every number their cards state, each block linear of that rank."""
    config = I3Config.from_pretrained(REPO_ROOT / "configs" / preset)
    stated = (config.num_hidden_layers, config.hidden_size, config.low_rank, config.state_size, config.vocab_size,
              config.num_attention_heads, config.max_position_embeddings)
    assert stated == tuple(card.values())
    with torch.device("meta"):
        model = I3ForCausalLM(config)
    assert not any(isinstance(module, torch.nn.Linear) for module in model.model.layers.modules())
    assert all(m.A.shape[1] == card["rank"] for m in model.modules() if isinstance(m, I3LowRankLinear))


# --- checkpoint variants ---


def training_checkpoint(state, path):
    """As the original training scripts save it, with their config inside."""
    torch.save({"model_state_dict": state, "config": json.loads(fixture_file("200m", "config.json").read_text())}, path)


def prefixed(state, path):
    torch.save({f"i3.{key}": tensor for key, tensor in state.items()}, path)


@pytest.mark.parametrize(
    "write, name", [(training_checkpoint, "best.pt"), (prefixed, "i3.bin"), (save_file, "weights.safetensors")]
)
def test_checkpoint_variants_convert(tmp_path, write, name):
    """A training checkpoint (heads from its embedded config), `i3.`-prefixed keys and safetensors convert exactly."""
    write(torch.load(fixture_file("200m", "pytorch_model.bin"), weights_only=True), tmp_path / name)
    heads = [] if write is training_checkpoint else ["--num_heads", 4]
    convert(tmp_path / name, tmp_path / "out", *heads)
    assert_original_logits(tmp_path / "out", "200m")


# --- refusals ---


def tiny_llama(path):
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2)
    torch.save(LlamaForCausalLM(config).state_dict(), path)


def edited_fixture(edit):
    def write(path):
        state = torch.load(fixture_file("80m", "pytorch_model.bin"), weights_only=True)
        edit(state)
        torch.save(state, path)

    return write


BAD_CHECKPOINTS = {
    "llama": (tiny_llama, "no tensor `embed.weight`"),
    "missing": (edited_fixture(lambda s: s.pop("layers.12.ffn.2.bias")), "no tensor for i3's `model.layers.12.mlp"),
    "shape": (edited_fixture(lambda s: s.update({"layers.3.hybrid.A": torch.zeros(9, 9)})), r"A` has shape \(9, 9\)"),
    "unknown": (edited_fixture(lambda s: s.update({"layers.0.hybrid.E": torch.zeros(8)})), "unexpected tensor `layers"),
    "garbage": (lambda path: path.write_bytes(b"not a checkpoint"), "weights_only=True refused"),
    "code": (lambda path: torch.save({"embed.weight": torch.zeros(2, 2), "f": print}, path), "weights_only=True"),
    "tensor": (lambda path: torch.save(torch.zeros(3), path), "not a state dict"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_non_open_i3_checkpoint_is_refused_and_nothing_written(tmp_path, case):
    """Foreign, incomplete, misshapen, unreadable or code-carrying files fail naming the file, and write nothing."""
    write, problem = BAD_CHECKPOINTS[case]
    write(tmp_path / "weights.bin")
    with pytest.raises(SystemExit, match=problem) as error:
        convert(tmp_path / "weights.bin", tmp_path / "out", "--num_heads", 4)
    assert str(tmp_path / "weights.bin") in str(error.value)
    assert [path.name for path in tmp_path.iterdir()] == ["weights.bin"]


def test_heads_of_an_unpublished_width_must_be_given(tmp_path):
    """At a width no published model has, the converter asks for --config or --num_heads instead of guessing."""
    with pytest.raises(SystemExit, match="--num_heads"):
        convert(fixture_file("80m", "pytorch_model.bin"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_disagreeing_on_d_state_warns_and_the_tensors_win(tmp_path, caplog):
    """A config.json with a wrong d_state (as the published one has) logs a warning; the model keeps the tensors' 8."""
    original = json.loads(fixture_file("80m", "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**original, "d_state": 64}))
    convert(fixture_file("80m", "pytorch_model.bin"), tmp_path / "out", "--config", tmp_path / "config.json")
    assert any(r.levelname == "WARNING" and "d_state = 64" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["state_size"] == 8
    assert_original_logits(tmp_path / "out", "80m")


# --- tokenizers ---


def test_chunk_vocab_becomes_the_published_tokenizer(tmp_path):
    """With the original chunk vocab, the folder's AutoTokenizer gives the original tokenizer's ids and text."""
    convert(fixture_file("80m", "pytorch_model.bin"), tmp_path / "out", "--num_heads", 4,
            "--vocab", OPEN_I3 / "chunk_vocab_combined.json")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    for case in json.loads((OPEN_I3 / "chunk_tokenizer_cases.json").read_text()):
        assert tokenizer(case["text"], add_special_tokens=False).input_ids == case["ids"]
        assert tokenizer.decode(case["ids"]) == case["decoded"]


def test_bpe_tokenizer_json_is_saved_with_the_model(tmp_path):
    """An i3-200M style tokenizer.json becomes a fast tokenizer with <UNK> <PAD> <BOS> <EOS> as ids 0-3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<UNK>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<UNK>", "<PAD>", "<BOS>", "<EOS>"])
    bpe.train_from_iterator(["It is a truth universally acknowledged."] * 20, trainer=trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))
    convert(fixture_file("200m", "pytorch_model.bin"), tmp_path / "out", "--num_heads", 4,
            "--vocab", tmp_path / "tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    special_ids = [tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert special_ids == [0, 1, 2, 3]
    assert tokenizer("a truth").input_ids == bpe.encode("a truth").ids


@pytest.mark.parametrize("style", STYLES)
def test_converted_checkpoint_answers_chat_messages(tmp_path, style):
    """Converted with its tokenizer, a published checkpoint answers chat messages in the text-generation pipeline
    (the argmax loop's tokens after its chat template), pads on the left, and truncates at its learned positions."""
    if style == "80m":
        vocab = OPEN_I3 / "chunk_vocab_combined.json"
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE(unk_token="<UNK>"))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<UNK>", "<PAD>", "<BOS>", "<EOS>"])
        bpe.train_from_iterator(["User: how are you?\nAssistant: well, thank you."] * 20, trainer=trainer)
        vocab = tmp_path / "tokenizer.json"
        bpe.save(str(vocab))
    convert(fixture_file(style, "pytorch_model.bin"), tmp_path / "out", "--num_heads", 4, "--vocab", vocab)
    generator = pipeline("text-generation", model=str(tmp_path / "out"), trust_remote_code=True)
    tokenizer, model = generator.tokenizer, generator.model
    assert tokenizer.padding_side == "left" and tokenizer.model_max_length == 32
    assert len(tokenizer("word " * 40, truncation=True).input_ids) == 32
    messages = [{"role": "user", "content": "How are you?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    reply = generator(messages, max_new_tokens=6, do_sample=False)[0]["generated_text"][-1]
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    new = ids[0, -6:]
    if tokenizer.eos_token_id is not None and (new == tokenizer.eos_token_id).any():
        new = new[: int((new == tokenizer.eos_token_id).nonzero()[0, 0])]
    assert reply == {"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)}
