"""Pretrain an i3 language model with Accelerate and export a folder ready for `from_pretrained` and the Hub.

    accelerate launch train.py --max_train_steps 20 --config_overrides hidden_size=64 --output_dir out/smoke  # < 1 min
    accelerate launch train.py                                        # CPU, ~5 min: a small i3 on Jane Austen
    accelerate launch --mixed_precision bf16 train.py --config recipes/i3-80m.yaml           # one GPU
    accelerate launch --multi_gpu --num_processes 8 train.py --config recipes/i3-80m.yaml    # 8 GPUs
    accelerate launch --config_file configs/accelerate/fsdp2.yaml train.py --config recipes/i3-200m.yaml  # sharded
    accelerate launch train.py --config recipes/i3-80m.yaml --resume_from_checkpoint latest  # continue a killed run

Without data arguments it trains on five Jane Austen novels (data/austen) and holds Persuasion out. Every document
ends with the end-of-text token and documents are packed into `--block_size` blocks; the tokenizer is built from the
training split only. Two CPU processes: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2`.
Install first with `pip install -e .` (the repo as the package `i3`, which this script imports).

`--output_dir` receives model.safetensors, config.json with the code files (auto_map), the tokenizer,
generation_config.json, README.md (a model card filled in from the run), loss.png, all_results.json, and
checkpoints/step_N (written to a hidden folder, then renamed, so "latest" is always complete).
"""

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import datasets
import psutil
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, GradientAccumulationPlugin, set_seed
from huggingface_hub import create_repo, upload_folder
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoTokenizer, GenerationConfig, default_data_collator, get_scheduler
from transformers.utils.chat_template_utils import render_jinja_template

try:
    from i3.configuration_i3 import I3Config
    from i3.model_card import write_model_card
    from i3.modeling_i3 import I3ForCausalLM, I3LowRankLinear
    from i3.tokenization_i3 import (
        CHAT_TEMPLATE,
        MINIMUM_VOCAB_SIZE,
        SPECIAL_TOKENS,
        apply_export_settings,
        build_tokenizer,
    )
except ModuleNotFoundError as error:  # run from a checkout that was never installed
    raise SystemExit(f"error: {error}; install the repo first: pip install -r requirements-dev.txt") from None

REPO_ROOT = Path(__file__).resolve().parent

logger = get_logger(__name__)

AUSTEN = REPO_ROOT / "data" / "austen"
HELD_OUT_NOVEL = "persuasion.txt.xz"
SOURCE_KEYS = ("dataset_name", "dataset_config_name", "train_split", "validation_split", "train_file",
               "validation_file", "text_column", "messages_column", "probability")
LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSIONS = (".xz", ".gz", ".bz2", ".zst")


def fail(message: str):
    """Stop with a one-line error that names the argument to fix (exit status 1)."""
    raise SystemExit(f"error: {message}")


# --- arguments ---


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pretrain an i3 model (commands in the module docstring).")
    parser.add_argument("--config", help="YAML recipe whose keys are the argument names below; command-line flags win")

    group = parser.add_argument_group("Model")
    group.add_argument("--model_config", default="configs/i3-austen",
                       help="I3Config preset: a folder with config.json or a JSON file (vocab size and special "
                            "token ids come from the tokenizer)")
    group.add_argument("--config_overrides", help='preset fields to change, e.g. "hidden_size=128,chunk_size=32"')
    group.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations: less memory")
    group.add_argument("--torch_compile", action="store_true",
                       help="compile each decoder layer (inductor): one compile per layer kind, training only")

    group = parser.add_argument_group("Tokenizer (built from training documents and cached, unless given)")
    group.add_argument("--tokenizer_name", help="an existing tokenizer folder or Hub id to use instead")
    group.add_argument("--tokenizer_type", choices=["chunk", "bpe"], default="chunk",
                       help="chunk: i3's lossless 2-3 character chunks; bpe: byte-level BPE")
    group.add_argument("--vocab_size", type=int, default=4466, help="size of the built vocabulary")
    group.add_argument("--tokenizer_max_documents", type=int, default=200_000,
                       help="build the vocabulary from the first N training documents")
    group.add_argument("--tokenizer_cache_dir", help="where built vocabularies are cached (default ~/.cache/i3)")

    group = parser.add_argument_group(
        "Data: --train_file, else --dataset_name, else --datasets (a recipe's mixture), else the Austen novels")
    group.add_argument("--dataset_name", help="a Hub dataset id, e.g. roneneldan/TinyStories")
    group.add_argument("--dataset_config_name", help="its configuration, e.g. wikitext-103-raw-v1")
    group.add_argument("--train_split", default="train", help="split to train on")
    group.add_argument("--validation_split", default="validation", help='held-out split, or "none"')
    group.add_argument("--train_file", nargs="+", help="local .txt (one document per file), .json/.jsonl or "
                                                       ".parquet files, optionally .xz/.gz/.bz2/.zst compressed")
    group.add_argument("--validation_file", nargs="+", help="local held-out files, same formats")
    group.add_argument("--text_column", default="text", help="column holding each document's text")
    group.add_argument("--messages_column", help="column of chat messages [{role, content}, ...], rendered with "
                                                 "the tokenizer's chat template (instead of --text_column)")
    group.add_argument("--datasets", type=yaml.safe_load,
                       help="a list of sources, each with the keys dataset_name, dataset_config_name, train_split, "
                            "validation_split, train_file, validation_file, text_column, messages_column and "
                            "probability (mixing weight for datasets.interleave_datasets)")
    group.add_argument("--streaming", action="store_true", help="stream the datasets instead of downloading them")
    group.add_argument("--block_size", type=int, default=256, help="tokens per training sequence")
    group.add_argument("--separate_documents", action="store_true",
                       help="documents packed into one block do not see each other: position ids restart after each "
                            "end-of-text token, which the model reads as document boundaries (i3 mixer only)")
    group.add_argument("--max_eval_documents", type=int, help="held-out documents per source (default: all)")
    group.add_argument("--preprocessing_num_workers", type=int, help="processes for tokenization (not streaming)")

    group = parser.add_argument_group("Optimization")
    group.add_argument("--per_device_train_batch_size", type=int, default=8)
    group.add_argument("--per_device_eval_batch_size", type=int, default=32)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=2e-3, help="peak AdamW learning rate")
    group.add_argument("--weight_decay", type=float, default=0.1,
                       help="on linear and conv weight matrices only (not norms, biases, embeddings, recurrences)")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                       help="default: what `accelerate launch` / `accelerate config` says")

    group = parser.add_argument_group("Schedule")
    group.add_argument("--max_train_steps", type=int, default=400, help="optimizer steps")
    group.add_argument("--num_warmup_steps", type=int, default=30)
    group.add_argument("--lr_scheduler_type", default="cosine_with_min_lr", help="a transformers scheduler name")
    group.add_argument("--min_lr_rate", type=float, default=0.1, help="cosine_with_min_lr: final lr / peak lr")

    group = parser.add_argument_group("Evaluation")
    group.add_argument("--eval_steps", type=int, default=200, help="evaluate and print samples every N steps")
    group.add_argument("--sample_prompts", nargs="*", default=["It is a truth universally acknowledged",
                                                                "Emma Woodhouse, handsome, clever, and rich,"])
    group.add_argument("--max_new_tokens", type=int, default=64, help="length of the printed samples")

    group = parser.add_argument_group("Checkpointing")
    group.add_argument("--checkpointing_steps", type=int, default=200, help="save_state every N steps (0: never)")
    group.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep the newest N (0: all)")
    group.add_argument("--resume_from_checkpoint", help='a checkpoint folder, or "latest" in --output_dir')

    group = parser.add_argument_group("Output")
    group.add_argument("--output_dir", default="out/i3-austen")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--with_tracking", action="store_true", help="log metrics to --report_to trackers")
    group.add_argument("--report_to", default="all", help='"tensorboard", "wandb", ... or "all" installed')
    group.add_argument("--push_to_hub", action="store_true", help="upload --output_dir to --hub_model_id")
    group.add_argument("--hub_model_id", help="user/name on the Hub (default: the --output_dir name)")

    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_recipe(known.config, {action.dest for action in parser._actions}))
    args = parser.parse_args(argv)
    check_numbers(args)
    args.command = shlex.join(sys.argv[1:] if argv is None else argv)
    args.model_config = str(existing_path(args.model_config, "--model_config"))
    for flag in ("train_file", "validation_file"):
        for path in getattr(args, flag) or []:
            existing_path(path, f"--{flag}")
    checkpoint_dir = Path(args.output_dir) / "checkpoints"
    if not args.resume_from_checkpoint and latest_checkpoint(checkpoint_dir):
        fail(f"--output_dir {args.output_dir} holds checkpoints of an earlier run: pass --resume_from_checkpoint "
             "latest to continue it, or choose another --output_dir")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        fail(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder")
    return args


# every numeric flag and the values it accepts (None: the flag may be left out)
NUMBER_RANGES = {
    "vocab_size": (f"at least {MINIMUM_VOCAB_SIZE} (the special and byte tokens)",
                   lambda value: value >= MINIMUM_VOCAB_SIZE),
    "tokenizer_max_documents": ("a positive integer", lambda value: value > 0),
    "block_size": ("at least 2 tokens", lambda value: value >= 2),
    "max_eval_documents": ("a positive integer", lambda value: value is None or value > 0),
    "preprocessing_num_workers": ("a positive integer", lambda value: value is None or value > 0),
    "per_device_train_batch_size": ("a positive integer", lambda value: value > 0),
    "per_device_eval_batch_size": ("a positive integer", lambda value: value > 0),
    "gradient_accumulation_steps": ("a positive integer", lambda value: value > 0),
    "learning_rate": ("a positive number", lambda value: math.isfinite(value) and value > 0),
    "weight_decay": ("zero or more", lambda value: math.isfinite(value) and value >= 0),
    "max_grad_norm": ("a positive number", lambda value: value > 0),
    "max_train_steps": ("a positive integer", lambda value: value > 0),
    "num_warmup_steps": ("zero or more", lambda value: value >= 0),
    "min_lr_rate": ("between 0 and 1", lambda value: 0 <= value <= 1),
    "eval_steps": ("zero (only at the end) or more", lambda value: value >= 0),
    "max_new_tokens": ("a positive integer", lambda value: value > 0),
    "checkpointing_steps": ("zero (never) or more", lambda value: value >= 0),
    "checkpoints_total_limit": ("zero (keep all) or more", lambda value: value >= 0),
    "seed": ("zero or more", lambda value: value >= 0),
}


def check_numbers(args):
    for name, (expected, accepts) in NUMBER_RANGES.items():
        if not accepts(getattr(args, name)):
            fail(f"--{name} {getattr(args, name)}: must be {expected}")


def read_recipe(path: str, argument_names: set[str]) -> dict:
    recipe = yaml.safe_load(existing_path(path, "--config").read_text()) or {}
    unknown = sorted(set(recipe) - argument_names)
    if unknown:
        fail(f"--config {path}: unknown keys {unknown}; the keys are this script's argument names")
    return recipe


def source_flags(args: argparse.Namespace) -> dict:
    """The data arguments that describe one source (SOURCE_KEYS; `probability` belongs to mixture entries only)."""
    return {key: getattr(args, key, None) for key in SOURCE_KEYS}


def existing_path(path: str, flag: str) -> Path:
    """`path` as given, or relative to the repository (so recipes work from any directory)."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.exists():
            return candidate
    fail(f"{flag} {path!r}: no such file or folder")


def data_sources(flags: dict, mixture: list[dict] | None) -> list[dict]:
    """The training mixture as a list of sources with every key of SOURCE_KEYS: the single source the data `flags`
    (the SOURCE_KEYS arguments) name, else the `--datasets` mixture, else the Austen novels."""
    if flags["train_file"] or flags["dataset_name"]:
        sources = [flags]
    elif mixture:
        shared = {key: flags[key] for key in ("train_split", "validation_split", "text_column", "messages_column")}
        sources = [{**dict.fromkeys(SOURCE_KEYS), **shared, **entry} for entry in mixture]
    else:
        novels = sorted(str(path) for path in AUSTEN.glob("*.txt.xz") if path.name != HELD_OUT_NOVEL)
        sources = [{**flags, "train_file": novels, "validation_file": [str(AUSTEN / HELD_OUT_NOVEL)]}]
    for source in sources:
        unknown = sorted(set(source) - set(SOURCE_KEYS))
        if unknown:
            fail(f"--datasets entry {source.get('dataset_name')!r}: unknown keys {unknown}; use {list(SOURCE_KEYS)}")
        if str(source["validation_split"]).lower() == "none":
            source["validation_split"] = None
        for key in ("train_file", "validation_file"):
            source[key] = [str(existing_path(path, f"--{key}")) for path in source[key] or []]
    if sum(source["probability"] is None for source in sources) not in (0, len(sources)):
        fail("--datasets: give every source a probability, or none (then they alternate)")
    return sources


# --- data ---


def load_documents(source: dict, part: str, streaming: bool, render_chat):
    """The `part` ("train" or "validation") of one source as non-empty documents in a single `text` column."""
    if source["train_file"]:
        files = source[f"{part}_file"]
        if not files:
            return None
        suffixes = [suffix for suffix in Path(files[0]).suffixes if suffix not in COMPRESSIONS]
        builder = LOCAL_BUILDERS.get(suffixes[-1] if suffixes else "")
        if builder is None:
            fail(f"--{part}_file {files[0]}: use .txt, .json, .jsonl or .parquet (optionally compressed)")
        options = {"sample_by": "document"} if builder == "text" else {}
        label, request = f"--{part}_file {files[0]}", dict(path=builder, data_files=files, split="train", **options)
    else:
        if not source[f"{part}_split"]:
            return None
        label = f"--dataset_name {source['dataset_name']!r}"
        request = dict(path=source["dataset_name"], name=source["dataset_config_name"], split=source[f"{part}_split"])
    try:
        dataset = datasets.load_dataset(**request, streaming=streaming)
    except Exception as error:  # offline, unknown id, split or config: datasets says which in its first line
        offline = datasets.config.HF_HUB_OFFLINE
        hint = " (HF_HUB_OFFLINE is set: download it once online, or use local files)" if offline else ""
        fail(f"{label} could not be loaded{hint}: {str(error).strip().splitlines()[0]}")
    columns = dataset.column_names or list(next(iter(dataset)))
    chat = bool(source["messages_column"])
    column = source["messages_column"] if chat else source["text_column"]
    if column not in columns:
        fail(f"--{'messages' if chat else 'text'}_column {column!r} not in dataset columns {columns} of {label}")
    if chat:
        documents = dataset.map(lambda row: {"text": render_chat(row[column])}, remove_columns=columns)
    else:
        documents = dataset.select_columns([column])
        documents = documents.rename_column(column, "text") if column != "text" else documents
    return documents.filter(lambda row: bool(row["text"].strip()))  # an empty document would be a lone EOS


def chat_renderer(tokenizer):
    """messages -> text with the template of the tokenizer that will encode it; one still to be built will carry
    tokenization_i3's template and special tokens, so those render the same text now."""
    if tokenizer is not None:
        return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)
    return lambda messages: render_jinja_template([messages], chat_template=CHAT_TEMPLATE, **SPECIAL_TOKENS)[0][0]


def load_tokenizer(name: str):
    """The tokenizer of --tokenizer_name (a folder or a Hub id), or a one-line error that names it."""
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=True)
    except (OSError, ValueError) as error:
        fail(f"--tokenizer_name {name!r} could not be loaded: {str(error).strip().splitlines()[0]}")


def first_documents(documents, count: int):
    """At most `count` documents (datasets 4.x refuses to `take` more rows than a dataset has)."""
    if isinstance(documents, datasets.Dataset):
        count = min(count, len(documents))
    return documents.take(count)


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each document, ended by the end-of-text token so the model learns where documents stop."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def group_texts(batch: dict, block_size: int, eos_id: int | None = None) -> dict:
    """Concatenate documents (each already ending with EOS) and cut them into full blocks; the tail is dropped. With
    `eos_id`, each block also gets position ids that restart at its start and after every EOS, so that the model keeps
    the documents inside a block apart (transformers' packed-sequence convention)."""
    ids = list(chain.from_iterable(batch["input_ids"]))
    blocks = {"input_ids": [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]}
    if eos_id is not None:
        blocks["position_ids"] = [document_positions(block, eos_id) for block in blocks["input_ids"]]
    return blocks


def document_positions(block: list[int], eos_id: int) -> list[int]:
    positions, position = [], 0
    for token in block:
        positions.append(position)
        position = 0 if token == eos_id else position + 1
    return positions


def evaluation_windows(documents: list[list[int]], block_size: int, eos_id: int) -> list[dict]:
    """Windows over EOS + every held-out document (each ending with EOS), overlapping by one token, so that each
    text token is predicted exactly once (the model shifts labels by one). The EOS separators are read as context but
    never scored, so bits per byte divides the text's own NLL by the text's own bytes; padding is not scored either."""
    stream = [eos_id, *chain.from_iterable(documents)]
    labels = [-100, *chain.from_iterable(document[:-1] + [-100] for document in documents)]
    windows = []
    for start in range(0, len(stream) - 1, block_size - 1):
        window = stream[start : start + block_size]
        padding = block_size - len(window)
        windows.append({"input_ids": window + [eos_id] * padding,
                        "labels": labels[start : start + block_size] + [-100] * padding})
    return windows


def load_corpus(sources: list[dict], streaming: bool, render_chat, seed: int, max_eval_documents: int | None):
    """The training documents (the sources interleaved by their probabilities) and the held-out sets."""
    parts = [load_documents(source, "train", streaming, render_chat) for source in sources]
    probabilities = [source["probability"] for source in sources]
    train_documents = parts[0] if len(parts) == 1 else datasets.interleave_datasets(
        parts, probabilities=None if None in probabilities else probabilities, seed=seed,
        stopping_strategy="all_exhausted")
    held_out = [first_documents(documents, max_eval_documents) if max_eval_documents else documents
                for source in sources
                if (documents := load_documents(source, "validation", streaming, render_chat)) is not None]
    return train_documents, held_out


def training_loader(documents, tokenizer, block_size: int, batch_size: int, separate_documents: bool,
                    streaming: bool, num_workers: int | None, seed: int) -> DataLoader:
    """Blocks of `block_size` tokens packed from the documents, shuffled per epoch (streams through a buffer)."""
    workers = {} if streaming else {"num_proc": num_workers}
    blocks = documents.map(
        lambda batch: {"input_ids": encode_documents(tokenizer, batch["text"])},
        batched=True, remove_columns=["text"], **workers,
    ).map(group_texts, batched=True, **workers, fn_kwargs={
        "block_size": block_size, "eos_id": tokenizer.eos_token_id if separate_documents else None})
    if streaming:
        blocks = blocks.shuffle(seed=seed, buffer_size=10_000)
    return DataLoader(blocks.with_format("torch"), batch_size=batch_size, shuffle=not streaming, drop_last=True,
                      collate_fn=default_data_collator)


def evaluation_loader(held_out: list, tokenizer, block_size: int, batch_size: int) -> tuple[DataLoader | None, int]:
    """Windows over every held-out document and the UTF-8 bytes they hold (None and 0 without held-out data)."""
    texts = [row["text"] for documents in held_out for row in documents]
    if not texts:
        return None, 0
    windows = evaluation_windows(encode_documents(tokenizer, texts), block_size, tokenizer.eos_token_id)
    loader = DataLoader(windows, batch_size=batch_size, collate_fn=default_data_collator)
    return loader, sum(len(text.encode("utf-8")) for text in texts)


# --- model and optimizer ---


def model_config(preset: str, overrides: str | None, block_size: int, separate_documents: bool) -> I3Config:
    """The preset with --config_overrides, checked against --block_size before any data is read."""
    config = I3Config.from_pretrained(preset)
    if overrides:
        try:
            config.update_from_string(overrides)
            config.validate_architecture()
        except ValueError as error:
            fail(f"--config_overrides {overrides!r}: {error}")
    if separate_documents and not config.separates_packed_documents:
        fail(f"--separate_documents needs the i3 recurrent mixer; {preset} uses {config.recurrent_mixer!r}, which "
             "cannot drop its state inside a block")
    if config.position_embedding_type == "learned" and block_size > config.max_position_embeddings:
        fail(f"--block_size {block_size} is above the model's learned positions (max_position_embeddings="
             f"{config.max_position_embeddings} in {preset})")
    return config


def build_model(config: I3Config, tokenizer, max_new_tokens: int, gradient_checkpointing: bool,
                torch_compile: bool) -> I3ForCausalLM:
    """An untrained model sized to the tokenizer, with sampling defaults for `pipeline` and `generate`."""
    config.update({"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    config.validate_architecture()
    model = I3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=True, temperature=0.8, top_k=50, max_new_tokens=max_new_tokens)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    if torch_compile:
        # regional compilation, in place: layers of one kind share their compiled code (two compiles in all, seconds
        # rather than the minutes of a whole-model graph) and the weights keep their names
        for layer in model.model.layers:
            layer.compile()
    return model


def decayed_parameter_names(model: nn.Module) -> set[str]:
    """The weight matrices of linear and conv layers: the only parameters weight decay applies to. Norms, biases,
    embeddings (an output head tied to them included) and the recurrences' own parameters (A_log, dt_bias, D,
    token_shift, time_decay, w_mix, A...) keep their scale."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, I3LowRankLinear):
            names |= {f"{module_name}.A", f"{module_name}.B"}
        elif isinstance(module, (nn.Linear, nn.Conv1d)):
            names.add(f"{module_name}.weight")
    return names & {name for name, _ in model.named_parameters()}  # a tied head is listed under its embedding


def unwrapped_name(name: str) -> str:
    """A parameter's name in the bare model, from its name inside DDP / FSDP1 / activation-checkpoint wrappers."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")


def parameter_groups(model: nn.Module, decayed: set[str], weight_decay: float) -> list[dict]:
    """The optimizer's two groups: the `decayed` parameter names with `weight_decay`, every other parameter without."""
    parameters = [(unwrapped_name(name), parameter) for name, parameter in model.named_parameters()]
    return [{"params": [p for name, p in parameters if name in decayed], "weight_decay": weight_decay},
            {"params": [p for name, p in parameters if name not in decayed], "weight_decay": 0.0}]


def wraps_before_optimizer(accelerator: Accelerator) -> bool:
    """Whether the model must be wrapped before its optimizer is built: FSDP1 swaps the parameters for flat shards as
    it wraps, so its optimizer takes the wrapped ones, which keep their names (for the decay groups) only with
    `fsdp_use_orig_params: true`. FSDP2, DeepSpeed and DDP take the optimizer together with the model."""
    if accelerator.distributed_type != DistributedType.FSDP or accelerator.is_fsdp2:
        return False
    if not accelerator.state.fsdp_plugin.use_orig_params:
        fail("FSDP1 needs fsdp_use_orig_params: true in the accelerate config to keep weight decay off norms and "
             "biases (see configs/accelerate/fsdp1.yaml), or use FSDP2 (fsdp_version: 2)")
    return True


def parameters_are_sharded(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3): then every process must take
    part in each forward, generation included."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    return is_deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3


# --- training state, checkpoints ---


@dataclass
class TrainingProgress:
    """Where the run is; saved in every checkpoint, so a resumed run sees the same batches and keeps its history."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    train_losses: list = field(default_factory=list)  # [step, loss]
    evaluations: list = field(default_factory=list)  # {"step", "eval_loss", "perplexity", "bits_per_byte", "samples"}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict):
        self.__dict__.update(state)


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Finished saves, oldest first: only a completed save is ever named step_N (see save_checkpoint)."""
    saved = [path for path in checkpoint_dir.glob("step_*") if path.name[5:].isdigit()]
    return sorted(saved, key=lambda path: int(path.name[5:]))


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    saved = complete_checkpoints(checkpoint_dir)
    return saved[-1] if saved else None


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, step: int, keep: int):
    """`save_state` into a hidden folder, then one rename to step_N: a crash mid-write leaves no broken step_N."""
    partial = checkpoint_dir / f".partial-step_{step}"
    if accelerator.is_main_process:
        for stale in checkpoint_dir.glob(".partial-step_*"):  # left by a crashed save
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = checkpoint_dir / f"step_{step}"
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        logger.info(f"checkpoint {final}")
        for old in complete_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume(checkpoint: str, checkpoint_dir: Path, accelerator: Accelerator):
    """Restore weights, optimizer, scheduler, RNG states and TrainingProgress; "latest" with nothing saved yet starts
    afresh, so a crashed job can always be relaunched with the same command."""
    path = latest_checkpoint(checkpoint_dir) if checkpoint == "latest" else checkpoint
    if path is None:
        logger.info(f"no checkpoint in {checkpoint_dir} yet: starting from scratch", main_process_only=True)
        return
    logger.info(f"resuming from {path}", main_process_only=True)
    accelerator.load_state(str(path))


# --- training loop pieces ---


def training_batches(loader: DataLoader, progress: TrainingProgress, accelerator: Accelerator):
    """Batches epoch after epoch, starting where `progress` says: the same order as a run that was never stopped."""
    while True:
        loader.set_epoch(progress.epoch)
        skip = progress.batches_in_epoch
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            progress.batches_in_epoch += 1
            yield batch
        if progress.batches_in_epoch == 0:
            fail("the training data is shorter than one batch: lower --block_size or --per_device_train_batch_size")
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0


def training_step(model, batch: dict, optimizer, scheduler, accelerator: Accelerator, max_grad_norm: float):
    """One micro-batch: forward and backward, then (at the end of a gradient accumulation) clipping, the optimizer
    and the schedule. Returns the loss averaged over processes. A loss that is not finite raises FloatingPointError
    before the backward pass, so it never reaches the weights."""
    with accelerator.accumulate(model):
        loss = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), labels=batch["input_ids"],
                     use_cache=False).loss
        mean_loss = accelerator.reduce(loss.detach(), "mean")
        if not torch.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss.item()}")
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return mean_loss


def stop_on_bad_loss(error: FloatingPointError, step: int, checkpoint_dir: Path):
    """Stop the run at a NaN or infinite loss, pointing at the newest checkpoint."""
    newest = latest_checkpoint(checkpoint_dir)
    advice = f"{newest} is intact: resume from it" if newest else "no checkpoint was written: restart"
    fail(f"{error} at step {step}, stopped before updating the weights; {advice} with a lower --learning_rate")


def record_step(progress, bar, accelerator: Accelerator, loss: float, seconds: float, tokens: int, learning_rate):
    """Count the finished step and show it: progress bar, trackers, loss history."""
    progress.step += 1
    progress.tokens += tokens
    progress.train_seconds += seconds
    progress.train_losses.append([progress.step, loss])
    bar.update()
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{learning_rate:.2e}", tok_s=f"{tokens / seconds:,.0f}")
    accelerator.log({"train/loss": loss, "train/learning_rate": learning_rate,
                     "train/tokens_per_second": tokens / seconds}, step=progress.step)


@torch.no_grad()
def evaluate(model, loader: DataLoader, accelerator: Accelerator, num_bytes: int) -> dict:
    """Held-out loss (mean token NLL), perplexity, and bits per byte = sum of NLL / ln 2 / UTF-8 bytes of the text."""
    model.eval()
    total_nll = total_tokens = 0.0
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        scored = (labels != -100).sum(1).float()
        per_window = accelerator.gather_for_metrics(torch.stack([nll.sum(1), scored], dim=1))
        total_nll += per_window[:, 0].double().sum().item()
        total_tokens += per_window[:, 1].double().sum().item()
    model.train()
    loss = total_nll / total_tokens
    return {"eval_loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total_nll / math.log(2) / num_bytes}


def sample(model, tokenizer, accelerator: Accelerator, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    """Continuations of the prompts, sampled with a fixed seed off the training RNG streams. Every process
    generates, so that sharded weights are gathered by all of them together (`synced_gpus` keeps them stepping in
    lockstep); the main process keeps the texts."""
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        logger.info("no samples: FSDP1 cannot generate from flat-sharded parameters (FSDP2 can)",
                    main_process_only=True)
        return []
    model = accelerator.unwrap_model(model)
    model.eval()
    texts = []
    cuda_devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(accelerator.device)
            output = model.generate(ids, max_new_tokens=max_new_tokens,
                                    synced_gpus=parameters_are_sharded(accelerator) and accelerator.num_processes > 1)
            texts.append(tokenizer.decode(output[0], skip_special_tokens=True))
    model.train()
    return texts if accelerator.is_main_process else []


def evaluate_and_sample(model, tokenizer, eval_loader, eval_bytes, accelerator, progress, prompts, max_new_tokens,
                        seed):
    """Held-out metrics and samples, logged and kept in `progress`."""
    # compiled layers run their eager code here: other shapes and no-grad mode must not trigger recompiles
    with torch.compiler.set_stance("force_eager"):
        results = evaluate(model, eval_loader, accelerator, eval_bytes) if eval_loader is not None else {}
        samples = sample(model, tokenizer, accelerator, prompts, max_new_tokens, seed)
    progress.evaluations.append({"step": progress.step, **results, "samples": samples})
    accelerator.log({f"eval/{name}": value for name, value in results.items()}, step=progress.step)
    summary = ", ".join(f"{name} {value:.4f}" for name, value in results.items())
    logger.info(f"step {progress.step}: {summary}\n" + "\n".join(f"  > {text!r}" for text in samples),
                main_process_only=True)


# --- export: weights, tokenizer, model card ---


def export(output_dir: Path, accelerator: Accelerator, model, tokenizer, progress: TrainingProgress) -> dict:
    """Weights, config and code, tokenizer, results and loss plot in `output_dir`, ready for `from_pretrained(...,
    trust_remote_code=True)`; returns the final results (on the main process, {} on the others)."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # every process joins the gather of sharded weights
    if not accelerator.is_main_process:
        return {}
    model = accelerator.unwrap_model(model)
    # weights, config with auto_map, code files, generation_config.json
    model.save_pretrained(output_dir, state_dict=state_dict)
    apply_export_settings(tokenizer, model.config).save_pretrained(output_dir)  # left padding, chat template, positions
    results = {key: value for key, value in progress.evaluations[-1].items() if key != "samples"}
    results.update(train_loss=progress.train_losses[-1][1], train_tokens=progress.tokens,
                   train_seconds=progress.train_seconds, tokens_per_second=progress.tokens / progress.train_seconds)
    (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_losses(progress, output_dir / "loss.png")
    return results


def push_to_hub(output_dir: Path, repo_name: str):
    repo_id = create_repo(repo_name, exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=output_dir, ignore_patterns=["checkpoints/*"])
    logger.info(f"uploaded to https://huggingface.co/{repo_id}", main_process_only=True)


def plot_losses(progress: TrainingProgress, path: Path):
    figure = Figure(figsize=(7, 4), layout="tight")
    axes = figure.subplots()
    axes.plot(*zip(*progress.train_losses), linewidth=0.8, label="training loss")
    evaluated = [record for record in progress.evaluations if "eval_loss" in record]
    axes.plot([r["step"] for r in evaluated], [r["eval_loss"] for r in evaluated], "o-", label="held-out loss")
    axes.set(xlabel="optimizer step", ylabel="loss (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)


def write_card(path: Path, args, sources: list[dict], accelerator: Accelerator, model, tokenizer, progress,
               results: dict, eval_bytes: int):
    """The folder's model card, filled in from this run (its arguments and data sources): what was trained on what,
    how, and how well."""
    held_out = [f"{s['dataset_name']} ({s['validation_split']})" for s in sources
                if s["dataset_name"] and s["validation_split"]]
    held_out += [Path(file).name for s in sources for file in s["validation_file"]]
    evaluation = "No held-out data was given." if "eval_loss" not in results else (
        f"Held out: {', '.join(held_out)}, {eval_bytes:,} bytes of UTF-8, never trained on.\n\n"
        "| loss (nats/token) | perplexity (per token) | bits per byte |\n|---|---|---|\n"
        f"| {results['eval_loss']:.4f} | {results['perplexity']:.2f} | {results['bits_per_byte']:.4f} |\n\n"
        "Bits per byte (sum of token NLL / ln 2 / UTF-8 bytes of the text) compares models with different "
        "tokenizers; the end-of-text separators between documents are read as context but not scored.")
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({torch.get_num_threads()} thread(s))")
    batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
    training = "\n".join([
        f"Data, each document ended by `{tokenizer.eos_token}` and packed into blocks of {args.block_size} tokens"
        f"{' kept apart inside a block' if args.separate_documents else ''}; tokenizer: {type(tokenizer).__name__} "
        f"with {len(tokenizer):,} entries, built from the training documents only.",
        "",
        *(f"- {describe_source(source)}" for source in sources),
        "",
        "| steps | tokens | batch | optimizer | schedule | precision | hardware | time |",
        "|---|---|---|---|---|---|---|---|",
        f"| {progress.step:,} | {progress.tokens:,} | {batch} x {args.block_size} | AdamW lr {args.learning_rate}, "
        f"weight decay {args.weight_decay}, clip {args.max_grad_norm} | {args.lr_scheduler_type}, "
        f"{args.num_warmup_steps} warmup | {precision} | {accelerator.num_processes} x {device} | "
        f"{progress.train_seconds / 60:.1f} min, {results['tokens_per_second']:,.0f} tokens/s |",
        "",
        f"Reproduce: `{f'accelerate launch train.py {args.command}'.strip()}`",
        "",
        "![training and held-out loss](loss.png)",
    ])
    samples = "At the end of training, sampled with temperature 0.8 and top-k 50:\n\n" + "\n\n".join(
        f"```text\n{text}\n```" for text in progress.evaluations[-1]["samples"])
    write_model_card(
        path, model=model, tokenizer=tokenizer, name=args.hub_model_id or Path(args.output_dir).name,
        repo=args.hub_model_id or args.output_dir, license="apache-2.0",
        summary=f"An i3 language model trained from scratch with `train.py` of the i3 repository: recurrent layers "
                f"(the `{model.config.recurrent_mixer}` mixer) under causal attention.",
        prompt=args.sample_prompts[0] if args.sample_prompts else "", tags=[],
        datasets=[s["dataset_name"] for s in sources if s["dataset_name"]],
        sections={"Training": training, "Evaluation": evaluation, "Samples": samples})


def describe_source(source: dict) -> str:
    """One markdown line: a Hub link (config, split) or the local file names, and the mixing probability."""
    if source["dataset_name"]:
        name = source["dataset_name"]
        text = f"[{name}](https://huggingface.co/datasets/{name}) {source['dataset_config_name'] or ''} "
        text += f"split `{source['train_split']}`"
    else:
        text = ", ".join(f"`{Path(file).name}`" for file in source["train_file"])
    return text + (f", probability {source['probability']}" if source["probability"] is not None else "")


# --- main ---


def check_processes_are_connected(accelerator: Accelerator):
    started = int(os.environ.get("WORLD_SIZE", 1))
    if started != accelerator.num_processes:  # e.g. an FSDP or DeepSpeed config on a machine without GPUs
        fail(f"{started} processes were launched on {accelerator.device} but each runs alone: on CPUs, run DDP with "
             "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu; the FSDP and DeepSpeed configs need GPUs")


def use_all_cores(accelerator: Accelerator) -> str:
    """The thread rule: one CPU process uses every core it may run on, unless the user chose a thread count
    (OMP_NUM_THREADS, or `accelerate launch --num_cpu_threads_per_process`). `accelerate launch` sets
    OMP_NUM_THREADS=1 for its processes when given neither, so under the launcher (recognised by the
    ACCELERATE_DYNAMO_BACKEND it sets) the launcher process's own environment and command line tell the two apart.
    Returns how the count was chosen, for the log."""
    if accelerator.device.type != "cpu" or accelerator.num_processes > 1:
        return ""
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ:  # not started by `accelerate launch`
        chosen = "OMP_NUM_THREADS" in os.environ
    else:
        try:
            launcher = psutil.Process().parent()
            chosen = "OMP_NUM_THREADS" in launcher.environ() or any(
                argument.startswith("--num_cpu_threads_per_process") for argument in launcher.cmdline())
        except psutil.Error:  # cannot tell: keep what the launcher chose
            chosen = True
    if chosen:
        return " (as set by OMP_NUM_THREADS / --num_cpu_threads_per_process)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores)
    return f" (all {cores} cores: no thread count was set)"


def main():
    args = parse_args()
    sources = data_sources(source_flags(args), args.datasets)
    config = model_config(args.model_config, args.config_overrides, args.block_size, args.separate_documents)
    output_dir, checkpoint_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoints"

    # a step always sums --gradient_accumulation_steps micro-batches, across epoch ends too (equal to one large batch)
    accumulation = GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False)
    accelerator = Accelerator(
        gradient_accumulation_plugin=accumulation, mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None, project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    logging.getLogger(__name__).setLevel(logging.INFO)
    check_processes_are_connected(accelerator)
    threads = use_all_cores(accelerator)
    logger.info(f"{accelerator.num_processes} process(es) on {accelerator.device} with {torch.get_num_threads()} "
                f"thread(s) each{threads}, mixed precision {accelerator.mixed_precision}", main_process_only=True)
    set_seed(args.seed)

    # data and tokenizer (the main process fills the datasets and tokenizer caches, the others then read them)
    given_tokenizer = load_tokenizer(args.tokenizer_name) if args.tokenizer_name else None
    with accelerator.main_process_first():
        train_documents, held_out = load_corpus(sources, args.streaming, chat_renderer(given_tokenizer), args.seed,
                                                args.max_eval_documents)
        tokenizer = given_tokenizer or build_tokenizer(
            args.tokenizer_type, first_documents(train_documents, args.tokenizer_max_documents), args.vocab_size,
            args.tokenizer_cache_dir)
        if tokenizer.eos_token_id is None:
            fail(f"--tokenizer_name {args.tokenizer_name}: the tokenizer has no end-of-text (eos) token")
        train_loader = training_loader(train_documents, tokenizer, args.block_size, args.per_device_train_batch_size,
                                       args.separate_documents, args.streaming, args.preprocessing_num_workers,
                                       args.seed)
    eval_loader, eval_bytes = evaluation_loader(held_out, tokenizer, args.block_size, args.per_device_eval_batch_size)

    # model, optimizer, schedule, and where a killed run left off
    model = build_model(config, tokenizer, args.max_new_tokens, args.gradient_checkpointing, args.torch_compile)
    logger.info(f"{model.num_parameters():,} parameters, vocabulary {len(tokenizer):,}", main_process_only=True)
    decayed = decayed_parameter_names(model)
    wrap_first = wraps_before_optimizer(accelerator)
    if wrap_first:
        model = accelerator.prepare(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, decayed, args.weight_decay), lr=args.learning_rate)
    # Accelerate steps a prepared scheduler once per process at every optimizer step, hence the factor
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        scheduler_specific_kwargs={"min_lr_rate": args.min_lr_rate} if "min_lr" in args.lr_scheduler_type else None)
    if wrap_first:
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    if args.resume_from_checkpoint:
        resume(args.resume_from_checkpoint, checkpoint_dir, accelerator)
    if args.with_tracking:
        accelerator.init_trackers("runs", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))})

    # the loop: an optimizer step every --gradient_accumulation_steps micro-batches, then evaluation and checkpoints
    model.train()
    losses, tokens, start = [], 0, time.perf_counter()
    bar = tqdm(total=args.max_train_steps, initial=progress.step, disable=not accelerator.is_local_main_process)
    with logging_redirect_tqdm(), bar:  # log lines print above the bar
        for batch in training_batches(train_loader, progress, accelerator):
            if progress.step >= args.max_train_steps:  # a run resumed from its last checkpoint
                break
            tokens += batch["input_ids"].numel() * accelerator.num_processes
            try:
                losses.append(training_step(model, batch, optimizer, scheduler, accelerator, args.max_grad_norm))
            except FloatingPointError as error:
                stop_on_bad_loss(error, progress.step + 1, checkpoint_dir)
            if not accelerator.sync_gradients:
                continue

            seconds = time.perf_counter() - start
            if args.torch_compile and progress.step == 0:
                logger.info(f"first step, compilation included: {seconds:.1f} s", main_process_only=True)
            record_step(progress, bar, accelerator, torch.stack(losses).mean().item(), seconds, tokens,
                        scheduler.get_last_lr()[0])
            last_step = progress.step == args.max_train_steps
            if last_step or (args.eval_steps and progress.step % args.eval_steps == 0):
                evaluate_and_sample(model, tokenizer, eval_loader, eval_bytes, accelerator, progress,
                                    args.sample_prompts, args.max_new_tokens, args.seed)
            if args.checkpointing_steps and (last_step or progress.step % args.checkpointing_steps == 0):
                save_checkpoint(accelerator, checkpoint_dir, progress.step, args.checkpoints_total_limit)
            if last_step:
                break
            losses, tokens, start = [], 0, time.perf_counter()

    # export: weights, tokenizer, results, model card, and the Hub if asked
    results = export(output_dir, accelerator, model, tokenizer, progress)
    if accelerator.is_main_process:
        write_card(output_dir / "README.md", args, sources, accelerator, accelerator.unwrap_model(model), tokenizer,
                   progress, results, eval_bytes)
        if args.push_to_hub:
            push_to_hub(output_dir, args.hub_model_id or output_dir.name)
    logger.info(f"saved {args.output_dir}: {json.dumps(results)}", main_process_only=True)
    accelerator.end_training()


if __name__ == "__main__":
    main()
