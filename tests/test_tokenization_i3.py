"""I3Tokenizer and the BPE builder: the chunk rule, published ids, losslessness, loading, chat, batching, bad input.

The chunk rule is written once, as `chunk_rule_reference` (plain Python, shared with the benchmark). It is checked
against what is independent of tokenization_i3: the fixtures' published ids (the original tokenizer's output) and
strings cut by hand; the numpy engine is then checked against it on generated text, in both modes.
"""

import glob
import inspect
import json
import lzma
import random
import shutil
import subprocess
import sys
import textwrap
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizer,
    PreTrainedTokenizerFast,
    pipeline,
)

from i3 import tokenization_i3
from i3.configuration_i3 import I3Config
from i3.tokenization_i3 import (
    CHAT_TEMPLATE,
    MINIMUM_VOCAB_SIZE,
    I3Tokenizer,
    apply_export_settings,
    build_chunk_vocab,
    build_tokenizer,
    chunk_rule_reference,
    split_chunks,
)

from conftest import REPO_ROOT, fresh_process_env, hub_cache_snapshot

OPEN_I3 = REPO_ROOT / "tests" / "fixtures" / "open-i3"
CASES = json.loads((OPEN_I3 / "chunk_tokenizer_cases.json").read_text())
ROOT_VOCAB = json.loads((REPO_ROOT / "vocab.json").read_text())
FIXTURE_VOCAB = json.loads((OPEN_I3 / "chunk_vocab_combined.json").read_text())["chunk_to_idx"]
FIXTURE_CHUNKS = json.loads((OPEN_I3 / "chunk_vocab_combined.json").read_text())["idx_to_chunk"]
BOOKS = sorted(glob.glob(str(REPO_ROOT / "data/austen/*.txt.xz")))
TRAINING_BOOKS = [path for path in BOOKS if "persuasion" not in path]


# --- the chunk rule's reference, as ids in each mode ---


def published_ids(text: str) -> list[int]:
    """The original tokenizer's ids: lower-cased, an unknown character is `<UNK>` (0)."""
    return [FIXTURE_VOCAB.get(chunk, 0) for chunk in chunk_rule_reference(text.lower(), FIXTURE_VOCAB)]


def lossless_ids(text: str, vocab: dict[str, int] = ROOT_VOCAB) -> list[int]:
    """i3's ids: case kept, an unknown character is the byte tokens of its UTF-8 form."""
    return [
        id_
        for chunk in chunk_rule_reference(text, vocab)
        for id_ in ([vocab[chunk]] if chunk in vocab else [vocab[f"<0x{b:02X}>"] for b in utf8(chunk)])
    ]


def utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def compat():
    return I3Tokenizer.from_open_i3_vocab(OPEN_I3 / "chunk_vocab_combined.json")


@pytest.fixture(scope="module")
def root():
    return I3Tokenizer(str(REPO_ROOT / "vocab.json"))


# Text that stresses the rule and the fallback: words, trigrams, space runs, scripts, emoji, marks, controls, surrogates.
PIECES = ["the", "and", "ing", "a", "I", "x", "ab", " ", "  ", "   ", "\n", "\t", "\r\n", ",", ".", "!", "The", "END",
          "é", "e\u0301", "ß", "東京", "Ωμέγα", "नमस्ते", "مرحبا", "😀", "👩‍👩‍👧",
          "\x00", "\x1b", "\ud800", "\udfff"]  # fmt: skip
TEXTS = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=30).map("".join),
    st.text(st.characters(exclude_categories=()), max_size=40),  # any code point, lone surrogates included
    st.text(alphabet=" thaeingdx\n", max_size=40),
)


# --- the chunk rule and published ids ---


# Cut by hand from the rule (docs/design.md#tokenizers): a trigram; a space before; a space after; 2 otherwise; 1 at
# the very end; no 3 when only 3 characters are left and nothing follows (the space-after test needs a 4th); "space" is
# " " only.
HAND_CUT = {
    "the cat": ["the", " c", "at"],
    "a cat sat": ["a ", "cat", " s", "at"],
    "xyz abc": ["xyz", " a", "bc"],
    "ab cd": ["ab", " c", "d"],
    "abc": ["ab", "c"],
    "ab\tcde": ["ab", "\tc", "de"],
}


@pytest.mark.parametrize("text", HAND_CUT)
def test_reference_cuts_as_by_hand(text):
    """The reference cuts strings as the rule does by hand, and `split_chunks` (the engine) agrees."""
    assert chunk_rule_reference(text) == split_chunks(text) == HAND_CUT[text]


@pytest.mark.parametrize("case", CASES, ids=[repr(case["text"][:20]) for case in CASES])
def test_reference_gives_published_ids(case):
    """The reference with the published vocabulary gives the original tokenizer's ids: it is the original rule."""
    assert published_ids(case["text"]) == case["ids"]


@settings(max_examples=1000, deadline=None)
@given(TEXTS)
def test_split_chunks_is_the_reference(text):
    """`split_chunks` (the engine, no vocabulary) cuts any string as the reference does (vocabularies count it)."""
    assert split_chunks(text) == chunk_rule_reference(text)


@pytest.mark.parametrize("case", CASES, ids=[repr(case["text"][:20]) for case in CASES])
def test_published_ids_and_text(compat, case):
    """An original vocabulary gives the original tokenizer's ids and decoded text for every fixture case."""
    ids = compat(case["text"])["input_ids"]
    assert ids == case["ids"]
    assert compat.decode(ids) == case["decoded"]


def test_published_ids_batched(compat):
    """A batch call (the datasets.map path) gives each fixture case its published ids."""
    assert compat([case["text"] for case in CASES])["input_ids"] == [case["ids"] for case in CASES]


@settings(max_examples=1000, deadline=None)
@given(TEXTS)
def test_published_ids_on_any_text(compat, text):
    """With the published vocabulary (many unknown chunks), ids equal the reference's on any string (which knows no
    special tokens, so `<UNK>` written in a text is chunked here too)."""
    assert compat(text, split_special_tokens=True)["input_ids"] == published_ids(text)


# Longer texts for batches: words holding trigrams, capitals, spaces, scripts, emoji, and chunks no vocabulary has;
# stretches of a held-out book with such words spliced in, where most chunks are known (few detours to walk).
WORDS = ["the", "The", "and", "nothing", "nation", "whether", "without", "ourselves", "Emma", "Knightley", "can't",
         "naïve", "café", "£5", "東京", "Ωμέγα", "😀", "qabababab", "xyzzy", "", "  ", "\n", "-", ",", "."]  # fmt: skip
PROSE = st.lists(st.sampled_from(WORDS), max_size=80).map(" ".join)
HELD_OUT = lzma.open(REPO_ROOT / "data/austen/persuasion.txt.xz", "rt", encoding="utf-8").read()
STRETCHES = st.builds(lambda start, size: HELD_OUT[start : start + size], st.integers(0, len(HELD_OUT)),
                      st.integers(0, 3000))  # fmt: skip
BOOKISH = st.builds(lambda before, word, after: before + word + after, STRETCHES, st.sampled_from(WORDS), STRETCHES)
BATCHES = st.one_of(
    st.lists(st.one_of(TEXTS, PROSE), min_size=1, max_size=8), st.lists(BOOKISH, min_size=1, max_size=8)
)


@settings(max_examples=600, deadline=None)
@given(BATCHES)
def test_batched_ids_follow_the_rule(compat, root, texts):
    """Batches (the `datasets.map` path) cut each text as if it were alone: the reference's ids with the published
    vocabulary and with the default one, and those decode back to every text."""
    assert compat(texts, split_special_tokens=True)["input_ids"] == list(map(published_ids, texts))
    encoded = root(texts, split_special_tokens=True)["input_ids"]
    assert encoded == list(map(lossless_ids, texts))
    assert list(map(root.decode, encoded)) == texts


def write_vocab(path: Path, chunks: list[str]) -> dict[str, int]:
    """An i3 vocab.json of the special and byte tokens, then `chunks`; returns the vocabulary."""
    vocab = {token: index for index, token in enumerate(["<unk>", "<pad>", "<bos>", "<eos>", *byte_tokens(), *chunks])}
    path.write_text(json.dumps(vocab), encoding="utf-8")
    return vocab


@pytest.mark.parametrize("many_detours", [0, 10**9], ids=["insert", "slices"])
def test_detours_of_every_length(tmp_path, monkeypatch, many_detours):
    """A chunk cut short puts the real chain off the rule's until they meet again ("qa" is missing, so "q" goes alone
    and the chain runs one character off through an "abab..." run): detours that rejoin within the first window looked
    up, within a longer one, and in none (then every position is looked up) give the reference's ids, alone or
    batched, whichever way the detours are put into the chain."""
    monkeypatch.setattr(tokenization_i3, "MANY_DETOURS", many_detours)
    chunks = ["".join(chunk) for size in (1, 2, 3) for chunk in product("ab ", repeat=size)]  # every one of a, b, space
    vocab = write_vocab(tmp_path / "vocab.json", chunks)
    tokenizer = I3Tokenizer(str(tmp_path / "vocab.json"))
    texts = ["ab" * 300 + "q" + "ab" * run + " ab" * 300 for run in (5, 40, 300)]
    for batch in [*([text] for text in texts), texts]:
        assert tokenizer(batch)["input_ids"] == [lossless_ids(text, vocab) for text in batch]


def test_vocabulary_of_many_characters(tmp_path):
    """1,100 CJK characters as tokens: more than a byte per character number and 64-bit chunk keys, same rule."""
    characters = [chr(0x4E00 + index) for index in range(1100)]
    chunks = [*characters, *map("".join, zip(characters, characters[1:40])), *map("".join, zip(*[characters[:30]] * 3))]
    vocab = write_vocab(tmp_path / "vocab.json", chunks)
    tokenizer = I3Tokenizer(str(tmp_path / "vocab.json"))
    assert tokenizer._engine.vocabulary.key_type is np.uint64
    rng = random.Random(0)
    alphabet = [*characters[:40], *characters[-5:], " ", "a", "😀", "\u4e00\u4e01\u4e02"]
    texts = ["".join(rng.choices(alphabet, k=rng.randrange(300))) for _ in range(30)]
    assert tokenizer(texts)["input_ids"] == [lossless_ids(text, vocab) for text in texts]


def test_compat_mode_survives_save_and_reload(compat, tmp_path):
    """Saving records compat "open-i3" and reloading keeps the published ids and special tokens."""
    compat.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["compat"] == "open-i3"
    reloaded = I3Tokenizer.from_pretrained(tmp_path)
    assert reloaded.compat == "open-i3" and len(reloaded) == len(FIXTURE_VOCAB)
    assert reloaded.unk_token == "<UNK>" and reloaded.pad_token is None
    assert reloaded(CASES[0]["text"])["input_ids"] == CASES[0]["ids"]


# --- lossless by default ---


@settings(max_examples=3000, deadline=None)
@given(TEXTS)
def test_round_trip_is_lossless(root, text):
    """decode(encode(s)) == s for every string: case, whitespace, any script, controls and lone surrogates."""
    assert root.decode(root(text)["input_ids"]) == text


@settings(max_examples=1000, deadline=None)
@given(TEXTS)
def test_lossless_ids_follow_the_rule(root, text):
    """Default-mode ids are the reference's, with UTF-8 byte tokens for unknown characters (special tokens written
    in a text are chunked too here, as the reference knows none)."""
    assert root(text, split_special_tokens=True)["input_ids"] == lossless_ids(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(TEXTS, st.sampled_from(["<eos>", "<pad>", "<bos>", "<unk>"])), max_size=4).map("".join))
def test_fast_path_agrees_with_transformers_path(root, text):
    """Plain calls (fast path) and calls transformers handles itself give the same ids, special tokens included."""
    generic = root(text, return_special_tokens_mask=True)["input_ids"]
    assert root(text)["input_ids"] == root([text])["input_ids"][0] == generic


def test_edge_strings(root):
    """Empty, lone-surrogate and control strings encode to the expected byte tokens and decode back."""
    assert root("")["input_ids"] == [] and root.decode([]) == ""
    assert root.convert_ids_to_tokens(root("\ud800")["input_ids"]) == ["<0xED>", "<0xA0>", "<0x80>"]
    assert root.decode(root("\ud800")["input_ids"]) == "\ud800"
    controls = "\x00\x1b[0m\r\n\x7f\u200b"
    assert root.decode(root(controls)["input_ids"]) == controls


def test_invalid_generated_bytes_decode_with_replacement(root):
    """A byte run that is not UTF-8 (only a model can produce one) decodes to U+FFFD instead of raising."""
    assert root.decode([ROOT_VOCAB["<0xFF>"], ROOT_VOCAB["ab"]]) == "\ufffdab"


def test_ten_megabyte_string(root):
    """A 10 MB string (Austen plus non-ASCII) encodes and decodes back unchanged."""
    book = lzma.open(REPO_ROOT / "data/austen/persuasion.txt.xz", "rt", encoding="utf-8").read()
    text = ((book + " naïve 東京 😀 ") * 22)[:10_000_000]
    ids = root(text)["input_ids"]
    assert len(ids) > 4_000_000
    assert root.decode(ids) == text


# --- special tokens, chat, batches ---


def test_special_token_ids(root):
    """i3 vocabularies fix <unk> 0, <pad> 1, <bos> 2, <eos> 3 (the model config's pad/bos/eos)."""
    assert [root.unk_token_id, root.pad_token_id, root.bos_token_id, root.eos_token_id] == [0, 1, 2, 3]
    assert root.convert_ids_to_tokens([0, 1, 2, 3, 4, 259]) == ["<unk>", "<pad>", "<bos>", "<eos>", "<0x00>", "<0xFF>"]
    assert root("plain text")["input_ids"] == lossless_ids("plain text")  # no special token is added


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
]


def test_chat_template_text(root):
    """The chat template renders "Role: content" lines, eos after each assistant turn, and "Assistant:" to prompt."""
    assert root.apply_chat_template(CONVERSATION, tokenize=False) == (
        "System: Be brief.\nUser: Hi there\nAssistant: Hello!<eos>\n"
    )
    prompt = root.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "System: Be brief.\nUser: Hi there\nAssistant:"
    with pytest.raises(Exception, match="roles are system, user and assistant"):
        root.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_repo_root_is_an_exported_tokenizer(tmp_path):
    """The repo root's tokenizer files are what `apply_export_settings` + `save_pretrained` write for the root model,
    byte for byte: chat_template.jinja is CHAT_TEMPLATE (its one source) written out, not a copy kept by hand."""
    assert (REPO_ROOT / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    tokenizer = I3Tokenizer(str(REPO_ROOT / "vocab.json"))
    apply_export_settings(tokenizer, I3Config.from_pretrained(REPO_ROOT)).save_pretrained(tmp_path)
    for name in ["chat_template.jinja", "tokenizer_config.json", "vocab.json", "tokenization_i3.py"]:
        assert (tmp_path / name).read_bytes() == (REPO_ROOT / name).read_bytes(), name


def test_export_settings(tmp_path):
    """Any tokenizer exported with a model gets left padding and a chat template (the i3 one unless it has its own),
    and learned positions set `model_max_length`; the saved folder reloads with them."""
    learned = SimpleNamespace(position_embedding_type="learned", max_position_embeddings=96)
    built = build_tokenizer("bpe", TINY_CORPUS, MINIMUM_VOCAB_SIZE, tmp_path / "cache")
    bare = PreTrainedTokenizerFast(tokenizer_object=built.backend_tokenizer, eos_token="<eos>")  # as converted
    assert bare.padding_side == "right" and bare.chat_template is None
    apply_export_settings(bare, learned).save_pretrained(tmp_path / "bpe")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "bpe")
    assert (reloaded.padding_side, reloaded.chat_template, reloaded.model_max_length) == ("left", CHAT_TEMPLATE, 96)
    compat = I3Tokenizer.from_open_i3_vocab(OPEN_I3 / "chunk_vocab_combined.json")
    apply_export_settings(compat, SimpleNamespace(position_embedding_type="rope", max_position_embeddings=96))
    assert compat.chat_template == tokenization_i3.OPEN_I3_CHAT_TEMPLATE and compat.model_max_length > 10**20


def test_chat_template_ids(root):
    """Tokenized chats end the assistant turn with the eos id, which is what stops generation."""
    ids = root.apply_chat_template(CONVERSATION)["input_ids"]
    assert ids == lossless_ids("System: Be brief.\nUser: Hi there\nAssistant: Hello!") + [3] + lossless_ids("\n")


def test_chat_pipeline(root):
    """`pipeline("text-generation")` takes chat messages with this tokenizer and answers as the assistant."""
    config = LlamaConfig(vocab_size=len(root), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=1, bos_token_id=2, eos_token_id=3)  # fmt: skip
    torch.manual_seed(0)
    generator = pipeline("text-generation", model=LlamaForCausalLM(config), tokenizer=root)
    reply = generator([{"role": "user", "content": "Hi"}], max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert [message["role"] for message in reply] == ["user", "assistant"]
    assert isinstance(reply[-1]["content"], str)


BATCH = ["The end.", "a", ""]


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_padding(root, side):
    """Padding fills with id 1 on the requested side and masks exactly the padding."""
    expected = [lossless_ids(text) for text in BATCH]
    width = max(map(len, expected))
    pads = [[1] * (width - len(ids)) for ids in expected]
    masks = [[1] * len(ids) for ids in expected]
    out = root(BATCH, padding=True, padding_side=side, return_tensors="pt")
    if side == "right":
        assert out["input_ids"].tolist() == [ids + pad for ids, pad in zip(expected, pads)]
        assert out["attention_mask"].tolist() == [mask + [0] * len(pad) for mask, pad in zip(masks, pads)]
    else:
        assert out["input_ids"].tolist() == [pad + ids for ids, pad in zip(expected, pads)]
        assert out["attention_mask"].tolist() == [[0] * len(pad) + mask for mask, pad in zip(masks, pads)]


def test_batch_truncation(root):
    """Truncation keeps the first (or, truncation_side left, the last) max_length ids of each text."""
    expected = [lossless_ids(text) for text in BATCH]
    assert root(BATCH, truncation=True, max_length=2)["input_ids"] == [ids[:2] for ids in expected]
    root.truncation_side = "left"
    try:
        assert root(BATCH, truncation=True, max_length=2)["input_ids"] == [ids[-2:] for ids in expected]
    finally:
        root.truncation_side = "right"


class GenericI3Tokenizer(I3Tokenizer):
    """I3Tokenizer without its batched route: transformers' Python backend encodes each text through `_tokenize`."""

    _encode_plus = PreTrainedTokenizer._encode_plus


CALL_OPTIONS = [
    {}, {"padding": True}, {"padding": True, "padding_side": "right", "pad_to_multiple_of": 4},
    {"padding": "max_length", "max_length": 6}, {"truncation": True, "max_length": 2},
    {"truncation": True, "max_length": 3, "padding": "max_length"}, {"max_length": 2},
    {"return_length": True}, {"return_length": True, "padding": True}, {"return_attention_mask": False},
    {"return_token_type_ids": True, "return_special_tokens_mask": True}, {"add_special_tokens": False},
    {"return_tensors": "pt", "padding": True}, {"return_tensors": "np", "truncation": True, "max_length": 1, "padding": True},
]  # fmt: skip


def as_lists(value):
    return value.tolist() if hasattr(value, "tolist") else value


@pytest.mark.parametrize("pattern", [None, "bos_eos"])
@pytest.mark.parametrize("options", CALL_OPTIONS, ids=map(str, CALL_OPTIONS))
def test_batched_route_is_transformers_route(options, pattern):
    """Every truncation, padding and output option gives what the Python backend gives text by text, for batches
    and single texts, also when special tokens are added (`special_tokens_pattern`)."""
    vocab, kwargs = str(REPO_ROOT / "vocab.json"), {"special_tokens_pattern": pattern} if pattern else {}
    fast, generic = I3Tokenizer(vocab, **kwargs), GenericI3Tokenizer(vocab, **kwargs)
    for text in [[*BATCH, "Hi<eos> there", "naïve 😀"], "The end.", ""]:
        expected, encoded = generic(text, **options), fast(text, **options)
        assert encoded.keys() == expected.keys()
        for key in expected:
            assert type(encoded[key]) is type(expected[key])
            assert as_lists(encoded[key]) == as_lists(expected[key])


def test_plain_calls_take_the_batched_route(root, monkeypatch):
    """The calls of `datasets.map` and train.py (strings, one or a batch, with the usual options) never reach the
    Python backend's text-by-text route, which is many times slower (the comment above `I3Tokenizer._encode_plus`)."""
    monkeypatch.setattr(PreTrainedTokenizer, "_encode_plus", lambda *args, **kwargs: pytest.fail("generic route"))
    root(BATCH, add_special_tokens=False)
    root(BATCH, padding=True, truncation=True, max_length=4, return_tensors="pt")
    root("The end.", return_tensors="pt")


@pytest.mark.skipif("sanitize_control_tokens" not in inspect.signature(PreTrainedTokenizer.apply_chat_template).parameters,
                    reason="transformers without sanitize_control_tokens")  # fmt: skip
def test_sanitized_chat_goes_the_generic_way(root):
    """`apply_chat_template(..., sanitize_control_tokens=True)` (transformers 5.25) encodes a control token written
    by the user as plain text, as transformers' own route does: options the batched route does not know go there."""
    chat = [{"role": "user", "content": "Hi <eos> there"}]
    ids = root.apply_chat_template(chat, sanitize_control_tokens=True)["input_ids"]
    assert root.eos_token_id not in ids and root.decode(ids) == "User: Hi <eos> there\n"
    generic = GenericI3Tokenizer(str(REPO_ROOT / "vocab.json"))
    assert ids == generic.apply_chat_template(chat, sanitize_control_tokens=True)["input_ids"]


# --- loading through AutoTokenizer in a fresh interpreter ---

FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    from transformers import AutoTokenizer
    text, results = sys.argv[1], {}
    for name, source in zip(["saved", "compat", "root", "hub"], sys.argv[2:]):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
        ids = tokenizer(text)["input_ids"]
        results[name] = {"class": type(tokenizer).__name__, "module": type(tokenizer).__module__, "ids": ids,
                         "decoded": tokenizer.decode(ids), "compat": tokenizer.compat,
                         "chat": tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
                                 if tokenizer.chat_template else None}
    print(json.dumps(results))
""")
FRESH_TEXT = "The END.  naïve café — 😀\n\ttabs"


@pytest.fixture(scope="module")
def fresh_loads(root, compat, tmp_path_factory):
    """One new Python, started in an empty directory, loads four folders by AutoTokenizer with trust_remote_code."""
    tmp = tmp_path_factory.mktemp("fresh")
    root.save_pretrained(tmp / "saved")
    compat.save_pretrained(tmp / "compat")
    snapshot = hub_cache_snapshot(tmp / "hub", "i3-test/chunk")
    shutil.copytree(tmp / "saved", snapshot)
    for name in ["config.json", "configuration_i3.py"]:  # a model repo: AutoTokenizer reads its config too
        shutil.copy(REPO_ROOT / name, snapshot)
    (tmp / "cwd").mkdir()
    sources = [str(tmp / "saved"), str(tmp / "compat"), str(REPO_ROOT), "i3-test/chunk"]
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, FRESH_TEXT, *sources], cwd=tmp / "cwd",
                            env=fresh_process_env(tmp), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["saved", "root", "hub"])
def test_fresh_process_loads_lossless(fresh_loads, name):
    """A saved folder, the repo root and a Hub cache entry (by repo id, offline) load the remote-code I3Tokenizer."""
    loaded = fresh_loads[name]
    assert loaded["class"] == "I3Tokenizer" and loaded["module"].startswith("transformers_modules")
    assert loaded["ids"] == lossless_ids(FRESH_TEXT) and loaded["decoded"] == FRESH_TEXT
    assert loaded["compat"] is None and loaded["chat"] == "User: Hi\n"


def test_fresh_process_loads_compat(fresh_loads):
    """A saved published-vocabulary tokenizer reloads in compat mode with the published ids and lossy text."""
    loaded = fresh_loads["compat"]
    assert loaded["compat"] == "open-i3" and loaded["ids"] == published_ids(FRESH_TEXT)
    assert loaded["decoded"] == "".join(FIXTURE_CHUNKS[str(index)] for index in loaded["ids"])


# --- building vocabularies ---


class Reads:
    """A re-iterable corpus that counts how often it is read to the end."""

    def __init__(self, texts):
        self.texts, self.reads = texts, 0

    def __iter__(self):
        yield from self.texts
        self.reads += 1


def byte_tokens() -> dict[str, int]:
    return {f"<0x{value:02X}>": 4 + value for value in range(256)}


# "abab abab" cuts into ab | ab | " a" | ba | b; "é" is one chunk. Single ASCII characters are left to byte tokens.
TINY_CORPUS = ["abab abab", "é"]
TINY_VOCAB = {"<unk>": 0, "<pad>": 1, "<bos>": 2, "<eos>": 3, **byte_tokens(),
              "ab": 260, " a": 261, "ba": 262, "é": 263}  # fmt: skip


def test_vocab_from_hand_counted_corpus(tmp_path):
    """Chunks are ranked by count, ties by string, after the 4 specials and 256 bytes; the size is respected."""
    assert json.loads(build_chunk_vocab(TINY_CORPUS, 264, tmp_path).read_text()) == TINY_VOCAB
    smaller = json.loads(build_chunk_vocab(TINY_CORPUS, 262, tmp_path).read_text())
    assert smaller == {token: index for token, index in TINY_VOCAB.items() if index < 262}


def test_vocab_build_is_deterministic_and_cached(tmp_path):
    """Same texts and size give byte-identical files; a second build reads the texts once (hash) and reuses the file."""
    corpus = Reads(TINY_CORPUS)
    first = build_chunk_vocab(corpus, 264, tmp_path / "a")
    assert corpus.reads == 2  # hash, then count
    assert build_chunk_vocab(corpus, 264, tmp_path / "a") == first and corpus.reads == 3
    assert build_chunk_vocab(TINY_CORPUS, 264, tmp_path / "b").read_bytes() == first.read_bytes()


def test_vocab_from_streaming_dataset(tmp_path):
    """A streaming `datasets` IterableDataset of {"text": ...} rows builds the same vocabulary as the plain list."""
    from datasets import IterableDataset

    rows = IterableDataset.from_generator(lambda: ({"text": text} for text in TINY_CORPUS))
    assert json.loads(build_chunk_vocab(rows, 264, tmp_path).read_text()) == TINY_VOCAB


def test_vocab_smaller_than_asked_warns(tmp_path):
    """A corpus with too few distinct chunks gives a smaller vocabulary and a warning that says how small."""
    with pytest.warns(UserWarning, match="4 distinct chunks.*has 264 tokens"):
        path = build_chunk_vocab(TINY_CORPUS, 300, tmp_path)
    assert len(json.loads(path.read_text())) == 264


def test_vocab_needs_re_iterable_texts(tmp_path):
    """A generator cannot be read twice, so it is refused with a message saying what to pass instead."""
    with pytest.raises(TypeError, match="re-iterable"):
        build_chunk_vocab((text for text in TINY_CORPUS), 264, tmp_path)


@pytest.mark.parametrize("kind", ["chunk", "bpe"])
def test_smallest_vocabulary(tmp_path, kind):
    """MINIMUM_VOCAB_SIZE (the special and byte tokens alone) builds either kind, which still round-trips any text;
    one token fewer is refused, naming the bound."""
    tokenizer = build_tokenizer(kind, TINY_CORPUS, MINIMUM_VOCAB_SIZE, tmp_path)
    assert len(tokenizer) == MINIMUM_VOCAB_SIZE == 260
    text = "Emma, naïve café 😀\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    with pytest.raises(ValueError, match="vocab_size must be at least 260"):
        build_tokenizer(kind, TINY_CORPUS, MINIMUM_VOCAB_SIZE - 1, tmp_path)


def test_root_vocab_is_the_austen_build(tmp_path):
    """The shipped vocab.json is build_chunk_vocab of the five training books (Persuasion held out) at 4,466."""
    books = [lzma.open(path, "rt", encoding="utf-8").read() for path in TRAINING_BOOKS]
    assert len(books) == 5
    assert build_chunk_vocab(books, 4466, tmp_path).read_bytes() == (REPO_ROOT / "vocab.json").read_bytes()


# --- bad input ---


def write(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


def test_missing_vocab_file(tmp_path):
    """A missing vocabulary file raises FileNotFoundError naming it (or saying none was found)."""
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        I3Tokenizer(str(tmp_path / "nowhere.json"))
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        I3Tokenizer(None)


@pytest.mark.parametrize(
    "content, compat, problem",
    [
        ("{not json", None, "not a JSON vocabulary"),
        ('["a", "b"]', None, "not a token -> id"),
        ('{"a": "zero"}', None, "not a token -> id"),
        ('{"a": 0, "b": 2}', None, "ids must be 0..1"),
        ('{"<unk>": 0, "ab": 1}', None, "256 byte tokens"),
        ('{"chunk_to_idx": {"<UNK>": 0}, "unk_token": "<UNK>", "unk_idx": 0}', None, "from_open_i3_vocab"),
        ('{"<unk>": 0}', "open-i3", "'<UNK>' as id 0"),
        ('{"chunk_to_idx": {"<UNK>": 1, "a": 0}, "unk_token": "<UNK>", "unk_idx": 1}', "open-i3", "'<UNK>' as id 0"),
        ('{"version": "1.0", "model": {"type": "BPE"}}', None, "not a token -> id"),
    ],
    ids=["corrupt", "list", "string ids", "gap", "no bytes", "open-i3 as i3", "i3 as open-i3", "unk", "tokenizer.json"],
)
def test_bad_vocab_files(tmp_path, content, compat, problem):
    """Corrupt or foreign vocabulary files raise ValueError naming the file and what is wrong."""
    path = write(tmp_path / "vocab.json", content)
    with pytest.raises(ValueError, match=problem) as error:
        I3Tokenizer(str(path), compat=compat)
    assert str(path) in str(error.value)


def test_bad_compat_value(tmp_path):
    """An unknown compat mode is refused by name."""
    with pytest.raises(ValueError, match="'open-i4'"):
        I3Tokenizer(str(REPO_ROOT / "vocab.json"), compat="open-i4")


@pytest.mark.parametrize("token_id", [-1, len(ROOT_VOCAB), 10**9])
def test_decoding_an_unknown_id_raises(root, token_id):
    """An id outside the vocabulary raises instead of being dropped or wrapped around."""
    with pytest.raises(ValueError, match="outside the vocabulary"):
        root.decode([5, token_id])


# --- byte-level BPE ---


def test_bpe_tokenizer(tmp_path):
    """The BPE kind trains from texts, has ids 0-3 for the specials, saves as tokenizer.json and round-trips."""
    paragraphs = lzma.open(TRAINING_BOOKS[0], "rt", encoding="utf-8").read().split("\n\n")[:300]
    with pytest.raises(ValueError, match="chunk"):
        build_tokenizer("wordpiece", paragraphs, 500, tmp_path / "cache")
    tokenizer = build_tokenizer("bpe", paragraphs, 500, tmp_path / "cache")
    assert len(tokenizer) == 500
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<pad>", "<bos>", "<eos>"]
    tokenizer.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").exists()
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded.is_fast and reloaded.eos_token_id == 3 and reloaded.pad_token_id == 1
    for text in ["Emma Woodhouse, handsome,  clever\n", "naïve café — 東京 😀\t", ""]:
        assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert reloaded.apply_chat_template(CONVERSATION[1:], tokenize=False) == "User: Hi there\nAssistant: Hello!<eos>\n"
