"""i3 tokenizers: the chunk tokenizer of the i3-80M code (SPEC 4), made lossless, and the i3-200M style byte-level BPE.

Chunk rule (the original, exactly). At position p the next chunk is 3 characters when
  1. `text[p:p+3]` is one of the 28 trigrams below, or
  2. `text[p-1]` is a space (p > 0), or
  3. `text[p+3]` is a space (it exists, so the chunk ends right before a space);
otherwise 2 characters, or 1 when a single character is left. Fewer than 3 characters left means no 3-chunk.
"Space" is " " only, not tabs or newlines. A chunk missing from the vocabulary falls back to its longest prefix that
is known, advancing by that prefix; when not even its first character is known, one character is emitted as unknown.
The next chunk is then chosen from the new position by the same rule.

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

Entry points: `I3Tokenizer.from_open_i3_vocab(path)` (the converter), `build_chunk_vocab(texts, vocab_size)` and
`build_tokenizer(kind, texts, vocab_size)` with kind "chunk" or "bpe" (the training script).
"""

import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate, groupby
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import (
    BatchEncoding,
    PaddingStrategy,
    PreTrainedTokenizerBase,
    TruncationStrategy,
)

# The 28 trigrams of the i3-80M code, in its order.
TRIGRAMS = (
    "the", "and", "ing", "ion", "tio", "for", "tha", "ter", "hat", "his", "ere", "ent", "her", "was",
    "you", "are", "not", "but", "can", "all", "whi", "one", "our", "out", "whe", "hav", "thi", "wit",
)  # fmt: skip


def _trigram_alternatives(trigrams: Iterable[str]) -> str:
    """`t(?:he|ha|...)|a(?:nd|...)`: grouped by first letter, the regex engine tests a letter instead of 28 words."""
    groups: dict[str, list[str]] = {}
    for trigram in trigrams:
        groups.setdefault(trigram[0], []).append(trigram[1:])
    return "|".join(f"{first}(?:{'|'.join(rests)})" for first, rests in groups.items())


# The chunk rule as one regex; findall cuts a whole text as if every chunk were in the vocabulary.
CHUNK_PATTERN = re.compile(
    r"(?<= )..."  # rule 2: the previous character is a space
    r"|...(?= )"  # rule 3: a space follows the three characters
    rf"|{_trigram_alternatives(TRIGRAMS)}"  # rule 1: a trigram
    r"|..?",  # otherwise two characters, one at the very end
    re.DOTALL,
)

OPEN_I3 = "open-i3"
SPECIAL_TOKENS = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
OPEN_I3_SPECIAL_TOKENS = {"unk_token": "<UNK>"}  # the published vocabularies have no pad, bos or eos
BYTE_TOKENS = tuple(f"<0x{value:02X}>" for value in range(256))
VOCAB_FILE_NAME = "vocab.json"

# "Role: content" lines; an assistant turn ends with eos so generation stops there. The generation prompt has no
# trailing space because chunks (and byte-level BPE words) carry their leading space.
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


def split_chunks(text: str) -> list[str]:
    """The rule's chunks of `text`, with no vocabulary (so no fallback): what a vocabulary is counted from."""
    return CHUNK_PATTERN.findall(text)


def _bytes_to_text(data: bytes) -> str:
    """UTF-8 letting lone surrogates through (they round-trip); invalid runs, only in generated ids, get U+FFFD."""
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace")


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


def build_chunk_vocab(
    texts: Iterable, vocab_size: int, cache_dir: str | os.PathLike | None = None, text_column: str = "text"
) -> Path:
    """Builds (or reuses) a lossless i3 chunk vocabulary of `vocab_size` tokens and returns its `vocab.json` path.

    Layout: the 4 special tokens, the 256 byte tokens, then the most frequent chunks (ties by string), streaming over
    the texts with only the chunk counts in memory. Single ASCII characters are left to the byte tokens. If the corpus
    has fewer distinct chunks than fit, the vocabulary is smaller than asked and a warning says so: build the model
    with `len(tokenizer)`. Same texts and size give a byte-identical file. Cache: `cache_dir`, default ~/.cache/i3.
    """
    room = vocab_size - len(SPECIAL_TOKENS) - len(BYTE_TOKENS)
    if room < 1:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + len(BYTE_TOKENS)} (specials + bytes)")

    def build(strings: Iterator[str]) -> str:
        counts = Counter()
        for text in strings:
            counts.update(split_chunks(text))
        chunks = sorted((c for c in counts if len(c) > 1 or not c.isascii()), key=lambda c: (-counts[c], c))
        if len(chunks) < room:
            warnings.warn(
                f"the corpus has {len(chunks)} distinct chunks, fewer than the {room} that vocab_size={vocab_size} "
                f"leaves room for: the vocabulary has {len(chunks) + vocab_size - room} tokens",
                stacklevel=2,
            )
        tokens = [*SPECIAL_TOKENS.values(), *BYTE_TOKENS, *chunks[:room]]
        return _vocab_json({token: index for index, token in enumerate(tokens)})

    settings = {"kind": "chunk", "vocab_size": vocab_size, "rule": CHUNK_PATTERN.pattern, "format": 1}
    return _cached_build(texts, settings, build, cache_dir, text_column)


class I3Tokenizer(PreTrainedTokenizer):
    """The i3 chunk tokenizer: lossless by default, or the published ids with `compat="open-i3"` (module docstring).

    Batches of plain strings (what `datasets.map(batched=True)` sends) go straight from text to ids; the other calls
    take the generic Python-backend route through `_tokenize`, and both give the same ids.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, compat: str | None = None, **kwargs):
        if compat not in (None, OPEN_I3):
            raise ValueError(f"compat must be None (lossless i3) or {OPEN_I3!r}, not {compat!r}")
        self.compat = compat
        self._vocab = read_vocab(vocab_file, compat)  # before super().__init__, which asks for the vocabulary
        self._tokens = sorted(self._vocab, key=self._vocab.__getitem__)
        # Segmentation lookup: an ASCII character missing from the vocabulary falls back to its one byte token, so it
        # is looked up like a chunk instead of taking the slow fallback path (same ids, far fewer misses).
        ascii_bytes = {} if compat else {chr(value): self._vocab[BYTE_TOKENS[value]] for value in range(128)}
        self._chunk_ids = {**ascii_bytes, **self._vocab}
        self._byte_values = {} if compat else {token: value for value, token in enumerate(BYTE_TOKENS)}
        for name, token in (OPEN_I3_SPECIAL_TOKENS if compat else SPECIAL_TOKENS).items():
            kwargs.setdefault(name, token)
        if not compat:
            kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        kwargs.setdefault("clean_up_tokenization_spaces", False)  # any clean-up would break the round trip
        super().__init__(compat=compat, **kwargs)

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
        return list(map(self._tokens.__getitem__, self._encode_text(text)))

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

    # --- text to ids ---

    def _encode_text(self, text: str) -> list[int]:
        """Ids of `text` by the chunk rule. The regex cuts the whole text as if every chunk were known; only the
        stretch after an unknown chunk is walked one chunk at a time, until its cuts meet the regex's again."""
        if self.compat:
            text = text.lower()
        chunks = split_chunks(text)
        ids = list(map(self._chunk_ids.get, chunks))
        if None not in ids:
            return ids
        starts = list(accumulate(map(len, chunks), initial=0))  # starts[k]: where chunk k begins; then len(text)
        encoded, k = [], 0
        while True:
            try:
                unknown = ids.index(None, k)
            except ValueError:
                return encoded + ids[k:]
            encoded += ids[k:unknown]
            k = self._encode_until_realigned(text, starts, unknown, encoded)

    def _encode_until_realigned(self, text: str, starts: list[int], k: int, encoded: list[int]) -> int:
        """Appends the ids from unknown chunk k on, with the vocabulary fallback, and returns the index of the first
        regex chunk that starts where a fallback-aware chunk starts (from there the regex cut is right again)."""
        pos = starts[k]
        while True:
            chunk = CHUNK_PATTERN.match(text, pos).group()
            known = next((chunk[:size] for size in range(len(chunk), 0, -1) if chunk[:size] in self._chunk_ids), "")
            if known:
                encoded.append(self._chunk_ids[known])
            elif self.compat:
                encoded.append(self.unk_token_id)
            else:  # a character outside ASCII and the vocabulary: its UTF-8 bytes
                encoded += (self._vocab[BYTE_TOKENS[value]] for value in text[pos].encode("utf-8", "surrogatepass"))
            pos += len(known) or 1
            while starts[k] < pos:
                k += 1
            if starts[k] == pos:
                return k

    def _encode_texts(self, texts: list[str], split_special_tokens: bool) -> list[list[int]]:
        """Ids of each text; one holding an added token (`<eos>` in a chat) is split on it by transformers first."""
        added = self.get_added_vocab()
        if split_special_tokens or not added:
            return list(map(self._encode_text, texts))
        has_added = re.compile("|".join(map(re.escape, added))).search  # `re` caches the compiled pattern
        return [self.convert_tokens_to_ids(self.tokenize(text)) if has_added(text) else self._encode_text(text)
                for text in texts]  # fmt: skip

    def _encode_plus(self, text, text_pair=None, **kwargs) -> BatchEncoding:
        """Plain strings, one or a batch, skip the per-text bookkeeping of the Python backend: ids, then transformers'
        own truncation, special tokens and padding. Pairs, pre-split words and per-token extras go the generic way."""
        single = isinstance(text, str)
        texts = [text] if single else text
        generic = ("is_split_into_words", "return_overflowing_tokens", "return_special_tokens_mask",
                   "return_offsets_mapping", "return_token_type_ids")  # fmt: skip
        if (
            text_pair is not None
            or not isinstance(texts, (list, tuple))
            or not all(isinstance(item, str) for item in texts)
            or any(kwargs.get(option) for option in generic)
        ):
            return super()._encode_plus(text, text_pair=text_pair, **kwargs)

        input_ids = self._encode_texts(texts, kwargs.get("split_special_tokens", self.split_special_tokens))
        add_special_tokens = kwargs.get("add_special_tokens", True)
        max_length, truncation = kwargs.get("max_length"), kwargs.get("truncation_strategy")
        if max_length and truncation not in (None, TruncationStrategy.DO_NOT_TRUNCATE):
            room = max_length - (self.num_special_tokens_to_add() if add_special_tokens else 0)
            input_ids = [
                self.truncate_sequences(ids, num_tokens_to_remove=len(ids) - room, truncation_strategy=truncation)[0]
                for ids in input_ids
            ]
        if add_special_tokens:
            input_ids = list(map(self.build_inputs_with_special_tokens, input_ids))
        padding = kwargs.get("padding_strategy", PaddingStrategy.DO_NOT_PAD)
        if padding != PaddingStrategy.DO_NOT_PAD:
            encoded = self.pad(
                {"input_ids": input_ids},
                padding=padding,
                max_length=max_length,
                pad_to_multiple_of=kwargs.get("pad_to_multiple_of"),
                padding_side=kwargs.get("padding_side"),
                return_attention_mask=kwargs.get("return_attention_mask"),
            )
        else:  # what pad() returns without padding, minus its per-text cost
            encoded = {"input_ids": input_ids}
            if kwargs.get("return_attention_mask") is not False:
                encoded["attention_mask"] = [[1] * len(ids) for ids in input_ids]
        if kwargs.get("return_length"):
            encoded["length"] = list(map(len, input_ids))
        return_tensors = kwargs.get("return_tensors")
        if single and not return_tensors:  # one text gives flat lists, as in transformers
            encoded = {key: values[0] for key, values in encoded.items()}
        return BatchEncoding(dict(encoded), tensor_type=return_tensors)


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
    if kind == "chunk":
        return I3Tokenizer(str(build_chunk_vocab(texts, vocab_size, cache_dir, text_column)))
    if kind == "bpe":
        settings = {"kind": "bpe", "vocab_size": vocab_size, "tokenizers": tokenizers.__version__, "format": 1}
        path = _cached_build(texts, settings, lambda strings: _train_bpe(strings, vocab_size), cache_dir, text_column)
        return PreTrainedTokenizerFast(
            tokenizer_file=str(path), chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS
        )
    raise ValueError(f'kind must be "chunk" or "bpe", not {kind!r}')


I3Tokenizer.register_for_auto_class("AutoTokenizer")  # save_pretrained then writes auto_map and copies this file

__all__ = ["I3Tokenizer", "build_chunk_vocab", "build_tokenizer", "read_vocab", "split_chunks"]
