"""i3 tokenizers: the chunk tokenizer of the published i3-80M code, made lossless, and an i3-200M style byte-level BPE.

Design notes: docs/design.md#tokenizers. The chunk rule is the i3-80M code's, exactly: at position p a chunk is 3
characters when `text[p:p+3]` is one of 28 common trigrams, or `text[p-1]` is a space, or `text[p+3]` is a space, and
2 otherwise; a chunk missing from the vocabulary falls back to its longest known prefix. It is written once, in plain
Python: `chunk_rule_reference` below.

Two modes, one rule:
- default (lossless): case is kept, and an unknown character becomes the `<0xNN>` tokens of its UTF-8 bytes, so
  `decode(encode(s)) == s` for every string. Lone surrogates (which UTF-8 cannot encode) are written with Python's
  `surrogatepass` and come back unchanged; a byte run that is not valid UTF-8 (only generated text can contain one)
  decodes with U+FFFD replacements. Ids: `<unk>` 0, `<pad>` 1, `<bos>` 2, `<eos>` 3, bytes 4-259, then chunks by
  frequency.
- `compat="open-i3"`: a published `chunk_vocab_combined.json` gives the published ids: text is lower-cased and an
  unknown character is `<UNK>` (id 0), so decoding is lossy, as in the original.
As in every transformers tokenizer, special tokens written in a text (`<eos>` in a chat) are matched before chunking
(`split_special_tokens=True` turns that off); nothing is added around a text when encoding.

This file reads top to bottom as the definition, then the speed: the rule, the byte fallback, `I3Tokenizer` (the
transformers interface), vocabulary files and building, `build_tokenizer` and `apply_export_settings` come first.
The last section is the engine: `chunk_rule_reference` computed for many texts at once with numpy, exactly the same
chunks, several times faster (benchmarks/bench_tokenizer.py measures it). The tests hold the engine equal to the
reference on generated text in both modes, and the published fixtures check both against the original tokenizer.

Entry points: `I3Tokenizer.from_open_i3_vocab(path)` (the converter), `build_chunk_vocab(texts, vocab_size)`,
`build_tokenizer(kind, texts, vocab_size)` with kind "chunk" or "bpe" and `MINIMUM_VOCAB_SIZE` (the training script),
and `apply_export_settings(tokenizer, config)` before saving a tokenizer next to a model (both).
"""

import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator
from itertools import groupby, pairwise, product
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import (
    BatchEncoding,
    PaddingStrategy,
    PreTrainedTokenizerBase,
    TruncationStrategy,
)

# --- the chunk rule ---

# The 28 trigrams of the i3-80M code, in its order.
TRIGRAMS = (
    "the", "and", "ing", "ion", "tio", "for", "tha", "ter", "hat", "his", "ere", "ent", "her", "was",
    "you", "are", "not", "but", "can", "all", "whi", "one", "our", "out", "whe", "hav", "thi", "wit",
)  # fmt: skip
TRIGRAM_SET = frozenset(TRIGRAMS)


def chunk_rule_reference(text: str, vocab: Container[str] | None = None) -> list[str]:
    """The chunks of `text`, one position at a time: the definition that the engine (last section) makes fast.

    At position p the chunk is 3 characters when `text[p:p+3]` is one of the 28 trigrams, or `text[p-1]` is a space,
    or `text[p+3]` is a space (so 3 characters must be left, and a 4th for the last test); otherwise 2, or 1 when one
    character is left. "Space" is " " only. A chunk missing from `vocab` falls back to its longest prefix in it, and
    when not even its first character is in it, that character alone is returned, unknown: the caller writes it as
    `<UNK>` (compat) or as its UTF-8 byte tokens (lossless). The next chunk starts right after, by the same rule.
    Without a vocabulary every chunk counts as known (what `split_chunks` returns).
    """
    chunks, p = [], 0
    while p < len(text):
        three = p + 3 <= len(text) and (
            text[p : p + 3] in TRIGRAM_SET
            or (p > 0 and text[p - 1] == " ")
            or (p + 3 < len(text) and text[p + 3] == " ")
        )
        chunk = text[p : p + 3] if three else text[p : p + 2]
        while vocab is not None and len(chunk) > 1 and chunk not in vocab:
            chunk = chunk[:-1]
        chunks.append(chunk)
        p += len(chunk)
    return chunks


def split_chunks(text: str) -> list[str]:
    """The rule's chunks of `text`, with no vocabulary (so no fallback): what a vocabulary is counted from. Computed
    by the engine, equal to `chunk_rule_reference(text)`."""
    return _split_texts([text])


# --- tokens, byte fallback, chat templates ---

OPEN_I3 = "open-i3"
SPECIAL_TOKENS = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
OPEN_I3_SPECIAL_TOKENS = {"unk_token": "<UNK>"}  # the published vocabularies have no pad, bos or eos
BYTE_TOKENS = tuple(f"<0x{value:02X}>" for value in range(256))
# The smallest i3 vocabulary, for either kind: the special and byte tokens alone still encode every text, as bytes.
MINIMUM_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
VOCAB_FILE_NAME = "vocab.json"

# i3 tokenizers pad on the left: the published recurrent mixers (`open-i3`, `rwkv4`) refuse right padding when a cache
# is kept, and with left padding a batch of prompts generates exactly what each prompt generates alone.
PADDING_SIDE = "left"
# What I3Tokenizer and the BPE of `build_tokenizer` set unless told otherwise (any clean-up of spaces would break the
# round trip); `apply_export_settings` gives the padding side to any tokenizer exported with a model.
TOKENIZER_DEFAULTS = {"padding_side": PADDING_SIDE, "clean_up_tokenization_spaces": False}


def _bytes_to_text(data: bytes) -> str:
    """UTF-8 letting lone surrogates through (they round-trip); invalid runs, only in generated ids, get U+FFFD."""
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace")


# The i3 chat template: "Role: content" lines; an assistant turn ends with eos so generation stops there. The
# generation prompt has no trailing space because chunks (and byte-level BPE words) carry their leading space.
# This string is the template's one source. `save_pretrained` writes it to chat_template.jinja (the repo root's file is
# that output, checked by a test), and transformers reads that file back when it loads a folder. It is kept here, not
# read from the .jinja file, because a tokenizer built in code needs it too, and transformers copies remote code into
# its modules cache one .py file at a time, without the files beside it (nor does a package install carry them).
CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('i3 chat roles are system, user and assistant, not ' + message['role']) }}
    {%- endif %}
    {{- message['role'] | capitalize + ': ' + message['content'] }}
    {%- if message['role'] == 'assistant' %}
        {{- eos_token }}
    {%- endif %}
    {{- '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'Assistant:' }}
{%- endif %}
"""

# The published i3-80M saw only lower-cased text (its tokenizer lower-cases everything) and has no end-of-text
# token, so its chat lines are lower case and nothing marks the end of a turn: generation stops at `max_new_tokens`.
OPEN_I3_CHAT_TEMPLATE = """\
{%- for message in messages %}
    {{- message['role'] + ': ' + message['content'] | lower + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'assistant:' }}
{%- endif %}
"""

# `tokenizer(...)` options that transformers' `prepare_for_model` applies to each text
PER_TEXT_OPTIONS = ("add_special_tokens", "max_length", "stride", "return_token_type_ids", "return_special_tokens_mask",
                    "return_length", "verbose")  # fmt: skip
# and those I3Tokenizer's batched route applies to the whole batch. A call that sets any other option (a text pair,
# pre-split words, offsets, overflowing tokens, `sanitize_control_tokens` of a chat, or one a later transformers adds)
# goes the generic way.
BATCH_OPTIONS = ("padding_strategy", "truncation_strategy", "pad_to_multiple_of", "padding_side",
                 "return_attention_mask", "return_tensors", "split_special_tokens")  # fmt: skip


class I3Tokenizer(PreTrainedTokenizer):
    """The i3 chunk tokenizer: lossless by default, or the published ids with `compat="open-i3"` (module docstring).

    Plain strings, one or a batch (what `datasets.map(batched=True)` sends), are encoded together by the engine, then
    handed to transformers' `prepare_for_model` and `pad`; pairs and pre-split words take the generic Python-backend
    route through `_tokenize`. Both give the same ids.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, compat: str | None = None, **kwargs):
        if compat not in (None, OPEN_I3):
            raise ValueError(f"compat must be None (lossless i3) or {OPEN_I3!r}, not {compat!r}")
        self.compat = compat
        self._vocab = read_vocab(vocab_file, compat)  # before super().__init__, which asks for the vocabulary
        self._tokens = sorted(self._vocab, key=self._vocab.__getitem__)
        self._byte_values = {} if compat else {token: value for value, token in enumerate(BYTE_TOKENS)}
        self._engine = ChunkEngine(self._vocab, None if compat else [self._vocab[token] for token in BYTE_TOKENS])
        defaults = {**(OPEN_I3_SPECIAL_TOKENS if compat else SPECIAL_TOKENS), **TOKENIZER_DEFAULTS,
                    "chat_template": OPEN_I3_CHAT_TEMPLATE if compat else CHAT_TEMPLATE}  # fmt: skip
        super().__init__(compat=compat, **{**defaults, **kwargs})

    @classmethod
    def from_open_i3_vocab(cls, vocab_file: str | os.PathLike, **kwargs) -> "I3Tokenizer":
        """The published tokenizer from its `chunk_vocab_combined.json`: same ids, same decoded text; `save_pretrained`
        keeps the mode (`"compat": "open-i3"` in tokenizer_config.json)."""
        return cls(str(vocab_file), compat=OPEN_I3, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return {**self._vocab, **self.get_added_vocab()}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return list(map(self._tokens.__getitem__, self._encode_chunks([text])[0]))

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.get(token, self.unk_token_id)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < len(self._tokens):
            raise ValueError(f"token id {index} is outside the vocabulary (ids 0-{len(self._tokens) - 1})")
        return self._tokens[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Concatenation, except that each run of byte tokens is decoded together (a character spans 1-4 bytes)."""
        return "".join(
            _bytes_to_text(bytes(map(self._byte_values.__getitem__, run))) if is_bytes else "".join(run)
            for is_bytes, run in groupby(tokens, key=self._byte_values.__contains__)
        )

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        path = Path(save_directory) / f"{filename_prefix + '-' if filename_prefix else ''}{VOCAB_FILE_NAME}"
        path.write_text(_vocab_json(self._vocab), encoding="utf-8")
        return (str(path),)

    # --- the batched route: a batch of plain strings through the engine at once ---
    #
    # Why transformers' private `_encode_plus` is overridden: its public hooks encode a batch one text at a time
    # (`tokenize` -> `_tokenize`, `convert_tokens_to_ids`, `prepare_for_model` per text). On the benchmark's paragraphs
    # in batches of 1000 (as `datasets.map` sends them; transformers 5.25, 2 shared cores) that route ran 0.3 million
    # characters a second against 10-13 for this one, about 35 times slower; answering `_tokenize` from the batch
    # encoded by the engine beforehand (public `__call__` + `_tokenize` only) still ran 0.5-0.7, about 20 times slower.
    # A call this route does not fully handle goes the generic way, so a new transformers option costs speed, not
    # correctness; tests/test_tokenization_i3.py holds both routes equal for every option.

    def _encode_plus(self, text, text_pair=None, **kwargs) -> BatchEncoding:
        """`tokenizer(text)` as the Python backend runs it, except that plain strings, one or a batch, are encoded
        together by the engine. Their ids then take the backend's own route: `prepare_for_model` for each text
        (truncation, special tokens, extra outputs), then `pad` for the batch."""
        texts = [text] if isinstance(text, str) else text
        handled = {*PER_TEXT_OPTIONS, *BATCH_OPTIONS}
        if (
            text_pair is not None
            or not isinstance(texts, (list, tuple))
            or not set(map(type, texts)) <= {str}
            or any(value for name, value in kwargs.items() if name not in handled)
        ):
            return super()._encode_plus(text, text_pair=text_pair, **kwargs)
        input_ids = self._encode_with_added_tokens(texts, kwargs.get("split_special_tokens", self.split_special_tokens))
        per_text = {name: kwargs[name] for name in PER_TEXT_OPTIONS if name in kwargs}
        per_text["truncation"] = kwargs.get("truncation_strategy", TruncationStrategy.DO_NOT_TRUNCATE).value
        padding = kwargs.get("padding_strategy", PaddingStrategy.DO_NOT_PAD).value
        mask, return_tensors = kwargs.get("return_attention_mask"), kwargs.get("return_tensors")
        if isinstance(text, str):
            return self.prepare_for_model(
                input_ids[0], **per_text, padding=padding, pad_to_multiple_of=kwargs.get("pad_to_multiple_of"),
                padding_side=kwargs.get("padding_side"), return_attention_mask=mask, return_tensors=return_tensors,
                prepend_batch_axis=True,
            )  # fmt: skip
        if self._prepare_changes_nothing(input_ids, per_text):
            encoded = {"input_ids": input_ids}
        else:  # as the Python backend does for each text of a batch: no padding or mask until the whole batch is in
            encoded = {}
            for ids in input_ids:
                for key, value in self.prepare_for_model(ids, **per_text, return_attention_mask=False).items():
                    encoded.setdefault(key, []).append(value)
        if padding != PaddingStrategy.DO_NOT_PAD:
            encoded = self.pad(
                encoded, padding=padding, max_length=per_text.get("max_length"),
                pad_to_multiple_of=kwargs.get("pad_to_multiple_of"), padding_side=kwargs.get("padding_side"),
                return_attention_mask=mask,
            )  # fmt: skip
        elif mask or (mask is None and "attention_mask" in self.model_input_names):
            # what pad() adds without padding, minus its call per text (which would cost a tenth of the batch's time)
            encoded["attention_mask"] = [[1] * len(ids) for ids in encoded["input_ids"]]
        return BatchEncoding(encoded, tensor_type=return_tensors)

    def _encode_with_added_tokens(self, texts: list[str], split_special_tokens: bool) -> list[list[int]]:
        """Ids of each text; one holding an added token (`<eos>` in a chat) is split on it by transformers first."""
        added = self.get_added_vocab()
        has_added = re.compile("|".join(map(re.escape, added))).search  # `re` caches the compiled pattern
        if split_special_tokens or not added or not has_added("\n".join(texts)):  # one search for the whole batch;
            return self._encode_chunks(texts)  # a token found across two texts only costs the search text by text
        special = [has_added(text) is not None for text in texts]
        plain = iter(self._encode_chunks([text for text, split in zip(texts, special) if not split]))
        return [self.convert_tokens_to_ids(self.tokenize(text)) if split else next(plain)
                for text, split in zip(texts, special)]  # fmt: skip

    def _encode_chunks(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text by the chunk rule alone (no added token matched), computed by the engine."""
        if self.compat:
            texts = [text.lower() for text in texts]  # one by one: str.lower's final sigma depends on the neighbours
        return self._engine.encode(texts, unknown_id=self.unk_token_id)

    def _prepare_changes_nothing(self, input_ids: list[list[int]], per_text: dict) -> bool:
        """Whether `prepare_for_model(ids, **per_text)` gives every text's ids alone, unchanged: no special token to
        add, no text to truncate, no extra output asked for."""
        extras = ("return_token_type_ids", "return_special_tokens_mask", "return_length")
        max_length = per_text.get("max_length")
        return (
            not any(per_text.get(name) for name in extras)
            and not (per_text.get("add_special_tokens", True) and self.num_special_tokens_to_add())
            and (per_text["truncation"] == TruncationStrategy.DO_NOT_TRUNCATE or max_length is None
                 or max(map(len, input_ids), default=0) <= max_length)
        )  # fmt: skip


I3Tokenizer.register_for_auto_class("AutoTokenizer")  # save_pretrained then writes auto_map and copies this file


# --- vocabulary files ---


def _vocab_json(vocab: dict[str, int]) -> str:
    """One `"token": id` per line in id order; ASCII escapes keep lone surrogates writable."""
    return json.dumps(vocab, indent=0, ensure_ascii=True) + "\n"


def read_vocab(path: str | os.PathLike, compat: str | None = None) -> dict[str, int]:
    """Token -> id from an i3 `vocab.json`; with compat="open-i3" also from a published `chunk_vocab_combined.json`.

    Every problem raises naming the file: missing, not JSON, foreign format, ids with gaps, no byte tokens.
    """
    if path is None:  # what from_pretrained passes for a folder without vocab.json
        raise FileNotFoundError(f"I3Tokenizer needs its {VOCAB_FILE_NAME}, and none was given or found")
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"I3Tokenizer vocabulary file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a JSON vocabulary file ({error})") from None
    is_open_i3 = isinstance(data, dict) and "chunk_to_idx" in data
    if is_open_i3 and compat != OPEN_I3:
        raise ValueError(f"{path} is a published open-i3 chunk vocabulary: load it with I3Tokenizer.from_open_i3_vocab")
    vocab = data["chunk_to_idx"] if is_open_i3 else data
    if not isinstance(vocab, dict) or not all(type(i) is int and isinstance(t, str) for t, i in vocab.items()):
        raise ValueError(f"{path} is not a token -> id JSON object (an i3 vocab.json or open-i3 'chunk_to_idx')")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{path}: token ids must be 0..{len(vocab) - 1}, each used once")
    if compat == OPEN_I3:  # the published file, or its vocab.json after save_pretrained
        if vocab.get("<UNK>") != 0 or (is_open_i3 and (data.get("unk_token"), data.get("unk_idx")) != ("<UNK>", 0)):
            raise ValueError(f"{path}: an open-i3 vocabulary has '<UNK>' as id 0")
    elif not all(token in vocab for token in BYTE_TOKENS):
        raise ValueError(f"{path}: an i3 vocabulary needs the 256 byte tokens <0x00>..<0xFF> (the lossless fallback)")
    return vocab


# --- building vocabularies from a corpus, cached on disk ---


def _iter_texts(texts: Iterable, text_column: str) -> Iterator[str]:
    """Strings as given, or the `text_column` of dataset rows (a `datasets` IterableDataset yields dicts)."""
    for item in texts:
        yield item if isinstance(item, str) else item[text_column]


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "i3"


def _cached_build(
    texts: Iterable, settings: dict, build: Callable[[Iterator[str]], str], cache_dir, text_column: str
) -> Path:
    """Path of `build(texts)`'s output, stored under a hash of the texts and settings and reused when it exists.

    The texts are read once to hash them and, only when nothing is cached, once more to build: so they must be a
    re-iterable collection (a list, `dataset["text"]`, a `datasets` Dataset or IterableDataset), not a generator.
    """
    if iter(texts) is texts:
        raise TypeError(
            "texts must be re-iterable (read once to hash, once to build): pass a list, dataset['text'] or a "
            "datasets (Iterable)Dataset, not a generator or iterator"
        )
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in _iter_texts(texts, text_column):
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little") + data)  # the length keeps ["ab", "c"] apart from ["a", "bc"]
    name = f"{settings['kind']}-{settings['vocab_size']}-{digest.hexdigest()[:16]}.json"
    path = Path(cache_dir or _default_cache_dir()) / name
    if not path.exists():
        content = build(_iter_texts(texts, text_column))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(content, encoding="utf-8")
        os.replace(partial, path)  # atomic: a concurrent reader sees no file or the whole file
    return path


def _check_vocab_size(vocab_size: int):
    if vocab_size < MINIMUM_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MINIMUM_VOCAB_SIZE} (the special and byte tokens): {vocab_size}"
        )


def build_chunk_vocab(
    texts: Iterable, vocab_size: int, cache_dir: str | os.PathLike | None = None, text_column: str = "text"
) -> Path:
    """Builds (or reuses) a lossless i3 chunk vocabulary of `vocab_size` tokens and returns its `vocab.json` path.

    Layout: the 4 special tokens, the 256 byte tokens, then the most frequent chunks (ties by string), streaming over
    the texts with only the chunk counts in memory. Single ASCII characters are left to the byte tokens. If the corpus
    has fewer distinct chunks than fit, the vocabulary is smaller than asked and a warning says so: build the model
    with `len(tokenizer)`. Same texts and size give a byte-identical file. Cache: `cache_dir`, default ~/.cache/i3.
    """
    _check_vocab_size(vocab_size)
    room = vocab_size - MINIMUM_VOCAB_SIZE

    def build(strings: Iterator[str]) -> str:
        counts = Counter()
        for group in _groups(strings, GROUP_CHARACTERS):  # numpy calls cost per call: cut whole groups
            counts.update(_split_texts(group))
        chunks = sorted((c for c in counts if len(c) > 1 or not c.isascii()), key=lambda c: (-counts[c], c))
        if len(chunks) < room:
            warnings.warn(
                f"the corpus has {len(chunks)} distinct chunks, fewer than the {room} that vocab_size={vocab_size} "
                f"leaves room for: the vocabulary has {len(chunks) + vocab_size - room} tokens",
                stacklevel=2,
            )
        tokens = [*SPECIAL_TOKENS.values(), *BYTE_TOKENS, *chunks[:room]]
        return _vocab_json({token: index for index, token in enumerate(tokens)})

    settings = {"kind": "chunk", "vocab_size": vocab_size, "rule": "i3-80M chunks", "trigrams": TRIGRAMS, "format": 1}
    return _cached_build(texts, settings, build, cache_dir, text_column)


# --- byte-level BPE (i3-200M style) and the one entry point for training scripts ---


def _train_bpe(strings: Iterator[str], vocab_size: int) -> str:
    """A `tokenizers` byte-level BPE of `vocab_size` tokens with the i3 special tokens as ids 0-3, as tokenizer.json."""
    tokenizer = Tokenizer(models.BPE())  # every byte is in the initial alphabet, so no token is ever unknown
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(strings, trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        warnings.warn(
            f"the corpus ran out of BPE merges: {tokenizer.get_vocab_size()} tokens instead of {vocab_size}",
            stacklevel=2,
        )
    return tokenizer.to_str(pretty=True)


def build_tokenizer(
    kind: str, texts: Iterable, vocab_size: int, cache_dir: str | os.PathLike | None = None, text_column: str = "text"
) -> PreTrainedTokenizerBase:
    """A tokenizer of `kind` "chunk" (`I3Tokenizer`, lossless) or "bpe" (`PreTrainedTokenizerFast`, byte-level),
    trained on `texts` (re-iterable; see `build_chunk_vocab`) or reused from the cache. Both have `<unk>` 0, `<pad>` 1,
    `<bos>` 2, `<eos>` 3, the i3 chat template, and add no special tokens when encoding. Both round-trip any valid
    Unicode text; the BPE (Rust) one refuses strings with lone surrogates, which the chunk one round-trips."""
    _check_vocab_size(vocab_size)
    if kind == "chunk":
        return I3Tokenizer(str(build_chunk_vocab(texts, vocab_size, cache_dir, text_column)))
    if kind == "bpe":
        settings = {"kind": "bpe", "vocab_size": vocab_size, "tokenizers": tokenizers.__version__, "format": 1}
        path = _cached_build(texts, settings, lambda strings: _train_bpe(strings, vocab_size), cache_dir, text_column)
        return PreTrainedTokenizerFast(
            tokenizer_file=str(path), chat_template=CHAT_TEMPLATE, **TOKENIZER_DEFAULTS, **SPECIAL_TOKENS
        )
    raise ValueError(f'kind must be "chunk" or "bpe", not {kind!r}')


# --- exporting a tokenizer with a model ---


def apply_export_settings(tokenizer: PreTrainedTokenizerBase, config) -> PreTrainedTokenizerBase:
    """Gives `tokenizer` (any kind, changed in place and returned) the settings of every folder exported with an i3
    model, before `save_pretrained`: left padding (`PADDING_SIDE`); a chat template, the i3 one unless it has its own
    (as the open-i3 one of a published vocabulary); and, when `config.position_embedding_type == "learned"`,
    `model_max_length = config.max_position_embeddings`, so that `truncation=True` stops at the last position."""
    tokenizer.padding_side = PADDING_SIDE
    tokenizer.init_kwargs["padding_side"] = PADDING_SIDE  # save_pretrained writes the init arguments it was given
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    if config.position_embedding_type == "learned":
        tokenizer.model_max_length = config.max_position_embeddings
    return tokenizer


# ======================================================================================================================
# The engine: `chunk_rule_reference` for many texts at once, in numpy
#
# Everything below computes exactly what `chunk_rule_reference` computes, with the vocabulary's fallback and, in
# lossless mode, the byte tokens; the tests hold the two equal on generated text in both modes. It exists for speed
# alone: the reference walks one chunk at a time in Python, the engine makes a handful of numpy calls per group of
# texts, each over every position at once:
#   1. Number the characters (`ChunkVocabulary.number`): the texts are joined, and bytes.translate (or a table of
#      all code points) turns each character into a small number, 1-27 for the rule's letters and space.
#   2. The rule's length at every position (`_rule_lengths`): its three tests are array comparisons, the trigrams one
#      lookup in a table of 28**3 flags; positions whose reads would leave their text are redone apart.
#   3. The chain of chunk starts 0 -> 0 + length[0] -> ... (`_chunk_start_flags`) is sequential, but it is a prefix
#      scan: each position is a map of d, the distance to the next chunk start, and maps compose (see there).
#   4. The vocabulary is looked up only along that chain, by a hash table of packed keys (`ChunkVocabulary`).
#   5. Where it cuts a chunk short, the real chain leaves the rule's chain for a few chunks: these detours are found by
#      the same scan in a window after each cut and put into the chain (`_chunk_group`).
#   6. Lossless mode: each unknown character becomes its UTF-8 byte tokens (`ChunkEngine._with_byte_tokens`).
#   7. Ids become each text's Python list by slicing one array of ready-made int objects (no int is made per token).
# ======================================================================================================================

LOOK_AHEAD = 3  # the rule reads text[p+3]; this many NULs after the joined texts keep every read inside the array
GROUP_CHARACTERS = 2**17  # texts encoded together: arrays this long stay in cache (15% faster than 3 times longer)
CODE_POINTS = 0x110000
RULE_CHARACTERS = "abcdefghijklmnopqrstuvwxyz "  # numbered 1-27 by every ChunkVocabulary: the rule reads numbers
SPACE_NUMBER = RULE_CHARACTERS.index(" ") + 1


class ChunkVocabulary:
    """Chunk (1-3 characters) -> id, looked up for many positions of a group of texts at once.

    Characters are numbered: 1-27 the rule's letters and space, then the other characters of the chunks, then one
    number for every character in no chunk. A chunk's numbers pack into one integer key (`bits` per character, the
    first lowest; uint32 up to 1,022 characters, else uint64), found in an open-addressing table 4-8 times larger than
    the vocabulary by a multiplicative hash and linear probing.
    """

    HASH_MULTIPLIERS = {np.uint32: 0x9E3779B1, np.uint64: 0x9E3779B97F4A7C15}  # 2**bits / golden ratio, odd

    def __init__(self, chunk_ids: dict[str, int]):
        chunks = {chunk: index for chunk, index in chunk_ids.items() if 1 <= len(chunk) <= LOOK_AHEAD}
        characters = [*RULE_CHARACTERS, *sorted({c for chunk in chunks for c in chunk} - set(RULE_CHARACTERS))]
        number = {character: index for index, character in enumerate(characters, start=1)}
        unknown = len(characters) + 1
        self.numbers = np.full(CODE_POINTS, unknown, np.min_scalar_type(unknown))  # code point -> number
        self.numbers[list(map(ord, characters))] = np.arange(1, unknown)
        self.latin1_numbers = self.numbers[:256].tobytes() if unknown < 256 else None  # for bytes.translate
        self.bits = unknown.bit_length()
        self.key_type = np.uint32 if 3 * self.bits <= 32 else np.uint64
        self.key_masks = np.array([2 ** (self.bits * length) - 1 for length in range(4)], self.key_type)

        key_bits, table_bits = np.dtype(self.key_type).itemsize * 8, max(4, (4 * len(chunks)).bit_length())
        multiplier = self.HASH_MULTIPLIERS[self.key_type]
        self.multiplier, self.shift = self.key_type(multiplier), self.key_type(key_bits - table_bits)
        self.slot_mask = 2**table_bits - 1
        keys, values = [0] * 2**table_bits, [0] * 2**table_bits  # key 0 (no character) marks an empty slot
        farthest = 0  # how far past its home slot a chunk had to go
        for chunk, index in chunks.items():
            key = sum(number[character] << (self.bits * i) for i, character in enumerate(chunk))
            slot = home = (key * multiplier) % 2**key_bits >> (key_bits - table_bits)
            while keys[slot]:
                slot = (slot + 1) & self.slot_mask
            keys[slot], values[slot] = key, index + 1
            farthest = max(farthest, (slot - home) & self.slot_mask)
        self.keys, self.values = np.array(keys, self.key_type), np.array(values, np.int64)
        self.further_slots = np.arange(1, farthest + 1)  # where a chunk not at its home slot can be

    def number(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The texts back to back, then LOOK_AHEAD NULs: their code points and character numbers (n + 3,) each, and
        where each text starts (texts + 1,) intp, the last entry n. Text in Latin-1 (most text, one byte a character)
        is numbered by bytes.translate, any other by a table of all code points (lone surrogates included)."""
        starts = np.zeros(len(texts) + 1, np.intp)
        np.cumsum(np.fromiter(map(len, texts), np.intp, len(texts)), out=starts[1:])
        joined = "".join([*texts, "\0" * LOOK_AHEAD])
        if self.latin1_numbers is not None:
            try:
                latin1 = joined.encode("latin-1")
            except UnicodeEncodeError:
                pass
            else:
                numbers = latin1.translate(self.latin1_numbers)
                return np.frombuffer(latin1, np.uint8), np.frombuffer(numbers, np.uint8), starts
        code_points = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), np.dtype("<u4"))
        return code_points, self.numbers.take(code_points), starts

    def chunk_keys(self, numbers: np.ndarray, positions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Keys of the chunks of `lengths` (m,) characters at `positions` (m,), from the character `numbers` of the
        group (n + LOOK_AHEAD,): (m,) key_type."""
        if self.bits == 8:  # a key is the chunk's bytes: one gather of 4 bytes read as a uint32 (twice as fast)
            words = np.ndarray(len(numbers) - LOOK_AHEAD, np.dtype("<u4"), numbers, strides=(1,))  # overlapping
            keys = words.take(positions)
        else:
            following = positions + 1
            keys = numbers[following].astype(self.key_type) << self.key_type(self.bits)
            following += 1
            keys |= numbers[following].astype(self.key_type) << self.key_type(2 * self.bits)
            keys |= numbers[positions]
        keys &= self.key_masks.take(lengths)
        return keys

    def ids_plus_one(self, keys: np.ndarray) -> np.ndarray:
        """Id + 1 of each key's chunk, 0 when it is not in the vocabulary, (len(keys),) int64."""
        slots = keys * self.multiplier
        slots >>= self.shift
        slots = slots.astype(np.intp)
        found = self.keys.take(slots)
        ids = self.values.take(slots)
        missed = (found != keys).nonzero()[0]  # few: filtered by index rather than by more passes over every key
        ids[missed] = 0
        probing = missed[found[missed] != 0]  # the home slot holds another chunk: this one may be further
        if probing.size:
            further = (slots[probing, None] + self.further_slots) & self.slot_mask  # (k, farthest)
            matches = self.keys.take(further) == keys[probing, None]  # at most one per row
            ids[probing] = (self.values.take(further) * matches).sum(axis=1)
        return ids

    def longest_known(
        self, numbers: np.ndarray, positions: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """For the rule's chunks of `lengths` (m,) at `positions` (m,): the step taken (the longest known prefix, else
        1) and the id + 1 of that prefix (0: not even the first character is known), (m,) uint8 and (m,) int64. Only
        chunks missing from the vocabulary get their prefixes looked up."""
        keys = self.chunk_keys(numbers, positions, lengths)
        ids = self.ids_plus_one(keys)
        missing = (ids == 0).nonzero()[0]  # (k,)
        if not missing.size:
            return lengths, ids
        missing_keys = keys[missing]
        # The first two and the first one characters (a missing chunk of 2 looks itself up again and misses again).
        prefixes = np.concatenate([missing_keys & self.key_masks[2], missing_keys & self.key_masks[1]])  # (2k,)
        two, one = self.ids_plus_one(prefixes).reshape(2, -1)
        steps = lengths.copy()
        steps[missing] = np.where(two != 0, 2, 1)
        ids[missing] = np.where(two != 0, two, one)
        return steps, ids


RULE_ONLY = ChunkVocabulary({})  # numbers the rule's characters only: for cutting text with no vocabulary

# Rule 1 reads three characters' numbers capped at 27 (a-z are 1-26, anything else 27) as one index into a table.
TRIGRAM_TABLE = np.zeros(28**3, bool)
for _trigram in TRIGRAMS:
    TRIGRAM_TABLE[np.ravel_multi_index([RULE_CHARACTERS.index(c) + 1 for c in _trigram], (28, 28, 28))] = True


def _trigram_starts(numbers: np.ndarray) -> np.ndarray:
    """Rule 1 at every position p < n: `text[p:p+3]` is a trigram, (n,) bool."""
    n = len(numbers) - LOOK_AHEAD
    letters = np.minimum(numbers, 27, dtype=np.uint16)  # (n + 3,)
    index = letters[:n] * np.uint16(28 * 28)
    index += letters[1 : n + 1] * np.uint16(28)
    index += letters[2 : n + 2]
    return TRIGRAM_TABLE.take(index)


def _text_edges(starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The positions where the rule's reads could leave their text: each text's first position and its last 3, with
    their room (characters left in the text, capped at 4) and whether they start the text; (e,) each, a position of a
    short text possibly twice."""
    begins, ends = starts[:-1, None], starts[1:, None]  # (texts, 1)
    candidates = np.concatenate([begins, ends - np.arange(3, 0, -1)], axis=1)  # (texts, 4)
    inside = (candidates >= begins) & (candidates < ends)
    return candidates[inside], np.minimum(ends - candidates, 4)[inside], (candidates == begins)[inside]


def _rule_lengths(numbers: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The rule's chunk length at every position of the joined texts, (n,) uint8 in 1-3, before any vocabulary fallback.

    `numbers`: the characters as a ChunkVocabulary numbers them, (n + LOOK_AHEAD,). The rules are first applied as if
    the group were one text, then redone at each text's edges, where they may only read the text itself.
    """
    n = len(numbers) - LOOK_AHEAD
    is_space = numbers == SPACE_NUMBER  # (n + 3,)
    take_three = _trigram_starts(numbers)  # (n,) rule 1
    edges, room, is_start = _text_edges(starts)
    trigram_at_edges = take_three[edges]
    take_three[1:] |= is_space[: n - 1]  # rule 2: text[p-1] is a space
    take_three |= is_space[LOOK_AHEAD:]  # rule 3: text[p+3] is a space
    lengths = take_three.view(np.uint8) + np.uint8(2)  # (n,)
    take_three_at_edges = (room >= 3) & (
        trigram_at_edges | (~is_start & is_space[edges - 1]) | ((room == 4) & is_space[edges + LOOK_AHEAD])
    )
    lengths[edges] = np.where(take_three_at_edges, 3, np.minimum(room, 2))
    return lengths


# Step 3, the chain of chunk starts as a scan. Reading positions left to right, keep d = the distance from p to the
# next chunk start (0-2). Position p maps d to step[p] - 1 when d == 0 (a chunk starts at p) and to d - 1 otherwise: a
# map of {0, 1, 2} to itself, coded as f(0) + 3 f(1) + 9 f(2) (27 codes). Maps compose associatively, so the d at every
# position, d == 0 marking the chunk starts, is a prefix scan of maps starting from d = 0. Each text's last chunk ends
# exactly at the text's end (the rule's room), so d is 0 again at every text start without special handling.


def _map_code(values: Iterable[int]) -> int:
    """The code of the map d -> values[d]."""
    return sum(value * 3**d for d, value in enumerate(values))


def _map_values(code: int) -> tuple[int, int, int]:
    """f(0), f(1), f(2) of the map coded `code`."""
    return code % 3, code // 3 % 3, code // 9


IDENTITY_MAP = _map_code((0, 1, 2))
COMPOSED = np.array(  # COMPOSED[27 * f + g]: f, then g
    [_map_code(_map_values(g)[v] for v in _map_values(f)) for f in range(27) for g in range(27)], np.uint8
)
APPLIED = np.array([_map_values(f)[d] for f in range(27) for d in range(3)], np.uint8)  # APPLIED[3 * f + d] = f(d)

# The scan's first level takes blocks of 8 positions by table. Their steps, 8 bytes of 1-3 read as one little-endian
# uint64, are squeezed into a 16-bit code: step i - 1 in bits 2i and 2i + 1.
BLOCK = 8


def _block_tables() -> tuple[np.ndarray, np.ndarray]:
    """By block code: the block's 8 maps composed, (4**8,) uint8, and for each d on entry the chunk starts, bit i set
    if one starts at the block's position i, (4**8, 3) uint8. Codes with a step of 4 are never looked up."""
    steps = np.array(list(product((1, 2, 3), repeat=BLOCK)), np.uint8)  # (3**8, 8)
    codes = ((steps.astype(np.intp) - 1) << (2 * np.arange(BLOCK))).sum(axis=1)
    maps, starts = np.zeros(4**BLOCK, np.uint8), np.zeros((4**BLOCK, 3), np.uint8)
    for entry in range(3):
        d = np.full(len(steps), entry, np.uint8)
        for i in range(BLOCK):
            starts[codes, entry] |= (d == 0).astype(np.uint8) << i
            d = np.where(d == 0, steps[:, i] - 1, d - 1).astype(np.uint8)
        maps[codes] += d * 3**entry
    return maps, starts


BLOCK_MAPS, BLOCK_STARTS = _block_tables()
SEQUENTIAL_SCAN = 512  # maps few enough to scan one by one in Python (cheaper than more levels of numpy calls)
APPLIED_VALUES = APPLIED.tolist()  # for that Python loop


def _block_codes(steps: np.ndarray) -> np.ndarray:
    """The 16-bit code of each block of 8 `steps` (uint8 in 1-3, a multiple of 8 long): (blocks,) intp."""
    x = steps.view("<u8") - np.uint64(0x0101010101010101)  # 8 bytes of 0-2
    x |= x >> np.uint64(6)
    x &= np.uint64(0x000F000F000F000F)  # 4 lanes of 16 bits: 2 steps in bits 0-3
    x |= x >> np.uint64(12)
    x &= np.uint64(0x000000FF000000FF)  # 2 lanes of 32 bits: 4 steps in bits 0-7
    x |= x >> np.uint64(24)
    x &= np.uint64(0xFFFF)
    return x.astype(np.intp)


def _entry_distances(maps: np.ndarray) -> np.ndarray:
    """d on entry to each of `maps` (uint8 map codes) when d is 0 before the first: an exclusive scan. Pairs are
    composed into maps half as many, whose entries are found the same way; a pair's first map is entered as the pair,
    its second after the first."""
    if len(maps) <= SEQUENTIAL_SCAN:
        distances, d = [], 0
        for code in maps.tolist():
            distances.append(d)
            d = APPLIED_VALUES[3 * code + d]
        return np.array(distances, np.uint8)
    count = len(maps)
    if count % 2:
        maps = np.append(maps, np.uint8(IDENTITY_MAP))
    firsts = maps[0::2].astype(np.intp)  # (pairs,)
    pair_entries = _entry_distances(COMPOSED.take(firsts * 27 + maps[1::2]))
    entries = np.empty(len(maps), np.uint8)
    entries[0::2] = pair_entries
    entries[1::2] = APPLIED.take(firsts * 3 + pair_entries)
    return entries[:count]


def _chunk_start_flags(steps: np.ndarray) -> np.ndarray:
    """Whether a chunk starts at each position, given `steps` (n,) uint8 in 1-3: (n + 1 or a few more,) bool, True at
    0, 0 + steps[0], ... up to n, where the last chunk ends (positions after n are steps of 1)."""
    n = len(steps)
    padded = np.ones(-(-(n + 1) // BLOCK) * BLOCK, np.uint8)
    padded[:n] = steps
    codes = _block_codes(padded)  # (blocks,)
    entries = _entry_distances(BLOCK_MAPS.take(codes))
    starts = BLOCK_STARTS.take(codes * 3 + entries)  # (blocks,) 8 flags as bits
    return np.unpackbits(starts, bitorder="little").view(bool)  # (blocks * 8,)


def _chunk_starts(steps: np.ndarray) -> np.ndarray:
    """The positions where chunks start, (chunks,) intp: 0, 0 + steps[0], ... for `steps` (n,) uint8 in 1-3."""
    return _chunk_start_flags(steps)[: len(steps)].nonzero()[0]


# Step 5: the vocabulary only matters where it cuts a chunk short. There the real chain leaves the rule's chain (a
# detour) and rejoins it a few chunks later, so only the rule's chain is looked up (about 0.45 lookups per character
# instead of one at every position), then a window of positions after each cut, cut into chunks by the same scan. A
# group with many or long detours (much text the vocabulary lacks) is looked up at every position instead.
DETOUR_WINDOW = 32  # positions after a cut looked up at first, 4 times more for the detours that need it
LONGEST_DETOUR = 512  # positions
MOST_DETOURS = 1 / 32  # per chunk of the rule's chain; a group with more is looked up everywhere
MANY_DETOURS = 256  # a group's detours are put in by slices up to this many (fast when few), by numpy's insert above


def _chunk_group(numbers: np.ndarray, starts: np.ndarray, vocabulary: ChunkVocabulary) -> tuple[np.ndarray, np.ndarray]:
    """The chunks of the joined texts (steps 2-5 above): where they start (chunks,) intp and their ids + 1 (chunks,)
    int64 (0: an unknown character)."""
    lengths = _rule_lengths(numbers, starts)
    on_chain = _chunk_start_flags(lengths)
    chain = on_chain[: len(lengths)].nonzero()[0]
    chain_lengths = lengths[chain]
    steps, ids = vocabulary.longest_known(numbers, chain, chain_lengths)
    cut_short = (steps != chain_lengths).nonzero()[0]  # indices into chain
    if not cut_short.size:
        return chain, ids
    if len(cut_short) <= MOST_DETOURS * len(chain):
        leaves = chain[cut_short]
        detours = _detours(numbers, lengths, on_chain, leaves + steps[cut_short], DETOUR_WINDOW, vocabulary)
        if detours is not None:
            return _take_detours(chain, ids, leaves, *detours)
    everywhere = np.arange(len(lengths))
    steps, ids = vocabulary.longest_known(numbers, everywhere, lengths)
    chain = _chunk_starts(steps)
    return chain, ids[chain]


def _detours(
    numbers: np.ndarray,
    lengths: np.ndarray,
    on_chain: np.ndarray,
    departures: np.ndarray,
    window: int,
    vocabulary: ChunkVocabulary,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The real chain from each of `departures` (d,), the positions right after the chunks cut short, to where it is
    back on the rule's chain (`on_chain`, flags up to n): where each rejoins (d,), and the chunks on the way, as their
    detour (w,), start (w,) and id + 1 (w,), in order. None if a detour is longer than LONGEST_DETOUR positions.

    Every position of a window after each departure is looked up, and the windows are cut into chunks by the scan as
    if they were texts; a detour that does not rejoin inside its window is done again in a window 4 times longer.
    """
    n = len(lengths)
    offsets = np.arange(window)
    positions = np.minimum(departures[:, None] + offsets, n)  # (d, window), n: past the group, on the chain
    readable = np.minimum(positions, n - 1).ravel()
    steps, ids = vocabulary.longest_known(numbers, readable, lengths[readable])
    steps = np.minimum(steps.reshape(positions.shape), (window - offsets).astype(np.uint8))  # chunks end in windows
    starts = _chunk_start_flags(steps.ravel())[: steps.size].reshape(steps.shape)  # (d, window)
    back = starts & on_chain[positions]  # (d, window) chunk starts of the rule's chain
    rejoined = back.any(axis=1)
    first_back = back.argmax(axis=1)  # (d,)
    rejoins = positions[np.arange(len(departures)), first_back]
    walked = starts & (offsets < first_back[:, None])  # (d, window): the chunks of each detour
    detour, offset = np.nonzero(walked & rejoined[:, None])
    walked_starts, walked_ids = positions[detour, offset], ids.reshape(steps.shape)[detour, offset]
    if rejoined.all():
        return rejoins, detour, walked_starts, walked_ids
    if 4 * window > LONGEST_DETOUR:
        return None
    longer = (~rejoined).nonzero()[0]
    again = _detours(numbers, lengths, on_chain, departures[longer], 4 * window, vocabulary)
    if again is None:
        return None
    rejoins[longer], longer_detours, longer_starts, longer_ids = again
    detour = np.concatenate([detour, longer[longer_detours]])
    order = np.argsort(detour, kind="stable")  # each detour's chunks come from one window, in order
    walked_starts, walked_ids = np.concatenate([walked_starts, longer_starts]), np.concatenate([walked_ids, longer_ids])
    return rejoins, detour[order], walked_starts[order], walked_ids[order]


def _take_detours(
    chain: np.ndarray,
    ids: np.ndarray,
    leaves: np.ndarray,
    rejoins: np.ndarray,
    walked_detours: np.ndarray,
    walked_starts: np.ndarray,
    walked_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The rule's chain (`chain`, `ids`) with the detours from the chunks cut short at `leaves` to `rejoins` put in:
    the chain's chunks strictly between the two give way to the detour's walked chunks. A detour is taken when its
    chunk cut short is on the real chain, not inside an earlier detour taken."""
    taken, reach = [], -1
    for detour, (leave, rejoin) in enumerate(zip(leaves.tolist(), rejoins.tolist())):
        if leave >= reach:
            taken.append(detour)
            reach = rejoin
    begins = np.searchsorted(chain, leaves[taken], "right")  # the chain's chunk after the one cut short
    ends = np.searchsorted(chain, rejoins[taken])  # the chain's chunk where the detour rejoins
    if len(taken) > MANY_DETOURS:  # drop the stretches by one mask, then insert all walked chunks at once
        inside = np.zeros(len(chain) + 1, np.int8)  # +1 where a dropped stretch begins, -1 where it ends
        inside[begins] += 1
        inside[ends] -= 1
        kept = np.cumsum(inside[:-1]) == 0
        walked = np.isin(walked_detours, taken)
        at = np.searchsorted(chain[kept], walked_starts[walked])  # right after the chunk cut short
        return np.insert(chain[kept], at, walked_starts[walked]), np.insert(ids[kept], at, walked_ids[walked])
    firsts = np.searchsorted(walked_detours, taken).tolist()  # each detour's walked chunks, in order
    lasts = np.searchsorted(walked_detours, taken, "right").tolist()
    starts, chunk_ids, resume = [], [], 0
    for begin, end, first, last in zip(begins.tolist(), ends.tolist(), firsts, lasts):
        starts += [chain[resume:begin], walked_starts[first:last]]
        chunk_ids += [ids[resume:begin], walked_ids[first:last]]
        resume = end
    return np.concatenate([*starts, chain[resume:]]), np.concatenate([*chunk_ids, ids[resume:]])


def _groups(strings: Iterable[str], characters: int) -> Iterator[list[str]]:
    """Consecutive lists of the strings, each closed once it holds `characters` characters or more."""
    group, size = [], 0
    for text in strings:
        group.append(text)
        size += len(text)
        if size >= characters:
            yield group
            group, size = [], 0
    if group:
        yield group


def _split_texts(texts: list[str]) -> list[str]:
    """Every chunk of every text by the rule alone (all chunks counted as known), in order."""
    _, numbers, starts = RULE_ONLY.number(texts)
    if starts[-1] == 0:
        return []
    lengths = _rule_lengths(numbers, starts)
    bounds = [*_chunk_starts(lengths).tolist(), int(starts[-1])]
    joined = "".join(texts)
    return [joined[start:end] for start, end in pairwise(bounds)]


class ChunkEngine:
    """Texts -> ids by the chunk rule and a vocabulary's fallback (steps 1-7), a group of texts at a time. An unknown
    character becomes its UTF-8 byte tokens when `byte_ids` (the ids of <0x00>..<0xFF>) are given, else one id."""

    def __init__(self, vocab: dict[str, int], byte_ids: list[int] | None):
        # An ASCII character missing from the vocabulary falls back to its one byte token: it is looked up like a
        # chunk of its own (same ids), so only characters outside ASCII can be unknown.
        ascii_bytes = {chr(value): byte_ids[value] for value in range(128)} if byte_ids else {}
        self.vocabulary = ChunkVocabulary({**ascii_bytes, **vocab})
        self.byte_ids = np.array(byte_ids or [], np.int64)
        # id + 1 -> the id as a Python int, made once (so no int is created per token); 0 -> an unknown character's id
        self.id_objects = np.array([None, *range(len(vocab))], dtype=object)

    def encode(self, texts: list[str], unknown_id: int | None) -> list[list[int]]:
        """Ids of each text, `unknown_id` for an unknown character when there are no byte tokens; the texts are
        encoded in groups of whole texts of about GROUP_CHARACTERS characters."""
        self.id_objects[0] = unknown_id
        return [ids for group in _groups(texts, GROUP_CHARACTERS) for ids in self._encode_group(group)]

    def _encode_group(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, the whole group at once."""
        code_points, numbers, starts = self.vocabulary.number(texts)  # (n + LOOK_AHEAD,) twice
        if starts[-1] == 0:
            return [[] for _ in texts]
        chunk_starts, ids_plus_one = _chunk_group(numbers, starts, self.vocabulary)  # (chunks,) twice
        offsets = np.searchsorted(chunk_starts, starts)  # (texts + 1,) where each text's ids begin, then the end
        if self.byte_ids.size:
            ids_plus_one, offsets = self._with_byte_tokens(ids_plus_one, chunk_starts, code_points, offsets)
        objects = self.id_objects.take(ids_plus_one)  # (ids,) object: tolist copies references, creating no ints
        return [objects[start:end].tolist() for start, end in pairwise(offsets.tolist())]

    def _with_byte_tokens(
        self, ids_plus_one: np.ndarray, chunk_starts: np.ndarray, code_points: np.ndarray, offsets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Step 6: `ids_plus_one` (chunks,) with each unknown character (0) replaced by the byte tokens of its UTF-8
        form (+ 1), and the texts' `offsets` (texts + 1,) into it moved to match."""
        unknown = (ids_plus_one == 0).nonzero()[0]
        if not unknown.size:
            return ids_plus_one, offsets
        code_points = code_points[chunk_starts[unknown]]
        text = code_points.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
        utf8 = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)  # the unknown characters' bytes, in order
        widths = np.ones(len(ids_plus_one), np.intp)  # (chunks,) ids per chunk
        widths[unknown] = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
        ids_plus_one = np.repeat(ids_plus_one, widths)  # an unknown character's 0 once per byte, in the order of utf8
        ids_plus_one[ids_plus_one == 0] = self.byte_ids.take(utf8) + 1
        moved = np.zeros(len(widths) + 1, np.intp)  # (chunks + 1,) old boundary -> new
        np.cumsum(widths, out=moved[1:])
        return ids_plus_one, moved[offsets]


__all__ = [
    "CHAT_TEMPLATE", "MINIMUM_VOCAB_SIZE", "I3Tokenizer", "apply_export_settings", "build_chunk_vocab",
    "build_tokenizer", "read_vocab", "split_chunks",
]  # fmt: skip
