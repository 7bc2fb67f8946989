"""Convert a published open-i3 checkpoint (https://github.com/FlameF0X/open-i3) into a Hub-ready i3 folder.

    python convert_open_i3.py --checkpoint pytorch_model.bin --output_dir i3-80m \
        [--config config.json] [--vocab chunk_vocab_combined.json | --vocab tokenizer.json] [--num_heads 16]

Both published model classes are recognised from their tensors: the i3-80M code (`hybrid` blocks, run by i3's
`open-i3` mixer) and the i3-200M code (RWKV-v4 `att` / `ffn` blocks, the `rwkv4` mixer), each with attention blocks
(docs/design.md#the-family). The tensors decide every size and the order of the layers. The number of attention heads is
not in any tensor: it comes from `--num_heads`, else the original config.json (`--config`, or the one a training
checkpoint embeds), else the published default for that width. Everything else a config says is only a cross-check
that warns: the published i3-80M config.json states d_state 64 for a model built with 32.

Checkpoints may be a bare state dict, a training checkpoint `{"model_state_dict": ..., "config": ...}`, or either
with keys prefixed `i3.`, saved with `torch.save` (read with `weights_only=True`) or as `.safetensors`. Nothing is
written unless the whole checkpoint converts: the folder is assembled under a temporary name and renamed at the end.
"""

import argparse
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

try:
    from i3.configuration_i3 import I3Config
    from i3.model_card import write_model_card
    from i3.modeling_i3 import I3ForCausalLM
    from i3.tokenization_i3 import I3Tokenizer, apply_export_settings
except ModuleNotFoundError as error:  # run from a checkout that was never installed
    raise SystemExit(f"error: {error}; install the repo first: pip install -r requirements-dev.txt") from None

OPEN_I3_URL = "https://github.com/FlameF0X/open-i3"

logger = logging.getLogger("convert_open_i3")

# Original key -> i3 key, applied top to bottom (`.attn.` must be renamed before `.att.` could match it).
LEGACY_KEYS = {
    r"^embed\.": "model.embed_tokens.",
    r"^pos_embed\.": "model.embed_positions.",
    r"^ln_f\.": "model.norm.",
    r"^head\.": "lm_head.",
    r"\.ln1\.": ".input_layernorm.",
    r"\.ln2\.": ".post_attention_layernorm.",
    r"\.hybrid\.": ".linear_attn.",  # i3-80M RWKVMambaHybrid: w_mix, A, B, C, D
    r"\.att\.": ".linear_attn.",  # i3-200M RWKVTimeMix: time_decay, time_first, time_mix_*, key, value, ...
    r"\.time_mix_": ".token_shift_",  # RWKV's share of the current token -> i3's share of the previous one
    r"\.attn\.qkv\.": ".self_attn.qkv_proj.",
    r"\.attn\.out_proj\.": ".self_attn.o_proj.",
    r"\.ffn\.0\.": ".mlp.up_proj.",  # nn.Sequential(Linear, GELU, Linear)
    r"\.ffn\.2\.": ".mlp.down_proj.",
    r"\.ffn\.": ".mlp.",  # i3-200M RWKVChannelMix: time_mix_*, key, receptance, value
    r"^layers\.": "model.layers.",
}

# The tensor that tells the original block classes apart -> (i3 layer type, recurrent mixer).
BLOCK_MARKERS = {
    "hybrid.w_mix": ("linear_attention", "open-i3"),  # i3HybridBlock, i3-80M code
    "att.time_decay": ("linear_attention", "rwkv4"),  # RWKVBlock, i3-200M code
    "attn.qkv.weight": ("full_attention", None),  # i3AttentionBlock / StandardAttentionBlock
}

# Heads of the published checkpoints, by (mixer, width): the only size no tensor records.
PUBLISHED_HEADS = {("open-i3", 512): 16, ("rwkv4", 768): 12}

# The chunk vocab of the i3-80M code has no special tokens (`<UNK>` = 0 only); the i3-200M BPE has four.
SPECIAL_TOKENS = {
    "open-i3": dict(pad_token_id=None, bos_token_id=None, eos_token_id=None),
    "rwkv4": dict(pad_token_id=1, bos_token_id=2, eos_token_id=3),  # <UNK> 0, <PAD> 1, <BOS> 2, <EOS> 3
}

# What every published block has, whatever the checkpoint: pre-LayerNorm, GELU feed-forward and head with biases.
PUBLISHED_BLOCKS = dict(layer_norm_eps=1e-5, hidden_act="gelu", attention_bias=True, mlp_bias=True,
                        lm_head_bias=True, tie_word_embeddings=False)

# What i3's mixer reproduces, for the model card.
PUBLISHED_MIXERS = {
    "open-i3": "the i3-80M code's `RWKVMambaHybrid`",
    "rwkv4": "the i3-200M code's RWKV-v4 time-mix and channel-mix",
}


class ConversionError(Exception):
    """A checkpoint, config or vocab that cannot be converted; the message names the file and the problem."""


# --- reading ---


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The original state dict with original key names, and the config a training checkpoint embeds (or None)."""
    try:
        if path.suffix == ".safetensors":
            loaded = load_file(path)
        else:  # weights_only: a checkpoint is data, never code to run
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConversionError(
            f"{path}: is not a checkpoint of only tensors and plain containers (torch.load with weights_only=True "
            "refused it)."
        )
    except Exception as error:
        raise ConversionError(f"{path}: cannot be read as a PyTorch or safetensors checkpoint ({error})")
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path}: holds a {type(loaded).__name__}, not a state dict.")
    embedded_config = loaded.get("config") if "model_state_dict" in loaded else None
    state = loaded.get("model_state_dict", loaded)
    if not state or not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise ConversionError(f"{path}: is not a state dict (a mapping of names to tensors).")
    if all(key.startswith("i3.") for key in state):
        state = {key.removeprefix("i3."): value for key, value in state.items()}
    return state, embedded_config if isinstance(embedded_config, dict) else None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: cannot be read as JSON ({error})")
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: holds a JSON {type(data).__name__}, not an object.")
    return data


# --- architecture from the tensors ---


def required_shape(state: dict[str, torch.Tensor], key: str, path: Path) -> torch.Size:
    """The shape of a 2-D tensor that every open-i3 checkpoint has and the sizes are read from."""
    if key not in state:
        raise ConversionError(f"{path}: has no tensor `{key}`, so it is not an open-i3 checkpoint.")
    if state[key].dim() != 2:
        raise ConversionError(f"{path}: `{key}` has shape {tuple(state[key].shape)}; a 2-D matrix was expected.")
    return state[key].shape


def layer_kinds(state: dict[str, torch.Tensor], path: Path) -> list[tuple[str, str | None]]:
    """(layer type, mixer) of each `layers.N`, bottom to top, from the one marker tensor its block class has."""
    indices = sorted({int(match[1]) for key in state if (match := re.match(r"layers\.(\d+)\.", key))})
    if indices != list(range(len(indices))) or not indices:
        raise ConversionError(f"{path}: the layers are numbered {indices[:20]}; expected layers.0 to layers.N.")
    kinds = []
    for index in indices:
        found = [kind for marker, kind in BLOCK_MARKERS.items() if f"layers.{index}.{marker}" in state]
        if len(found) != 1:
            markers = ", ".join(f"layers.{index}.{marker}" for marker in BLOCK_MARKERS)
            raise ConversionError(f"{path}: layers.{index} is not an open-i3 block: it needs exactly one of {markers}.")
        kinds.append(found[0])
    return kinds


def infer_config(state: dict[str, torch.Tensor], path: Path, num_heads: int | None) -> I3Config:
    """The i3 configuration that runs this checkpoint: every size from the tensors, the heads as given or published."""
    vocab_size, hidden_size = required_shape(state, "embed.weight", path)
    max_positions = required_shape(state, "pos_embed.weight", path)[0]
    kinds = layer_kinds(state, path)
    mixers = {mixer for _, mixer in kinds if mixer is not None}
    if len(mixers) != 1:
        raise ConversionError(f"{path}: needs recurrent layers of one kind, `hybrid` or `att`; found {sorted(mixers)}.")
    mixer = mixers.pop()
    first_ffn = "layers.0.ffn.key.weight" if kinds[0][1] == "rwkv4" else "layers.0.ffn.0.weight"
    sizes = dict(intermediate_size=required_shape(state, first_ffn, path)[0])
    if mixer == "open-i3":
        first_recurrent = next(i for i, (_, kind) in enumerate(kinds) if kind == "open-i3")
        sizes["state_size"] = required_shape(state, f"layers.{first_recurrent}.hybrid.A", path)[0]
    if num_heads is None:
        num_heads = PUBLISHED_HEADS.get((mixer, hidden_size))
    if num_heads is None:
        raise ConversionError(
            f"{path}: the number of attention heads is not stored in the tensors and no published model has width "
            f"{hidden_size} with this mixer; pass the original config.json with --config, or --num_heads."
        )
    try:
        return I3Config(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            layer_types=[layer_type for layer_type, _ in kinds],
            num_attention_heads=num_heads,
            recurrent_mixer=mixer,
            position_embedding_type="learned",
            max_position_embeddings=max_positions,
            **sizes,
            **PUBLISHED_BLOCKS,
            **SPECIAL_TOKENS[mixer],
        )
    except ValueError as error:
        raise ConversionError(f"{path}: gives no valid i3 configuration: {error}")


def cross_check(original: dict, config: I3Config, source: str):
    """Warn about every value the original config states differently from the tensors (which win)."""
    recurrent, attention = config.layer_types.count("linear_attention"), config.layer_types.count("full_attention")
    # original keys, in every spelling the published scripts and configs use -> the converted value
    facts = {
        "vocab_size": config.vocab_size, "d_model": config.hidden_size, "n_heads": config.num_attention_heads,
        "max_seq_len": config.max_position_embeddings, "seq_len": config.max_position_embeddings,
        "n_layers": config.num_hidden_layers,
        "n_hybrid_layers": recurrent, "conv_layers": recurrent, "n_rwkv_layers": recurrent,
        "n_attention_layers": attention, "attn_layers": attention, "n_attn_layers": attention,
    }
    if config.recurrent_mixer == "open-i3":
        facts["d_state"] = config.state_size
    for key, value in facts.items():
        if key in original and original[key] != value:
            logger.warning("%s says %s = %r, but the tensors give %r; using the tensors.", source, key, original[key],
                           value)


# --- converting ---


def to_i3_names(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename with `LEGACY_KEYS`; RWKV-v4 shift mixes, stored (1, 1, d) as the current token's share, become i3's
    (d,) share of the previous token, 1 - time_mix. Returns the renamed tensors and each new name's original."""
    renamed, original_names = {}, {}
    for key, tensor in state.items():
        new_key = key
        for pattern, replacement in LEGACY_KEYS.items():
            new_key = re.sub(pattern, replacement, new_key)
        if new_key in renamed:
            raise ConversionError(f"{path}: two tensors map to `{new_key}` (one is `{key}`).")
        if ".time_mix_" in key:
            tensor = 1 - (tensor.reshape(-1) if tensor.shape[:-1] == (1, 1) else tensor)
        renamed[new_key], original_names[new_key] = tensor, key
    return renamed, original_names


def build_model(
    config: I3Config, weights: dict[str, torch.Tensor], original_names: dict[str, str], path: Path
) -> I3ForCausalLM:
    """An I3ForCausalLM holding exactly these tensors, after checking names and shapes against the i3 model."""
    with torch.device("meta"):  # no memory and no random init for weights that are replaced next
        model = I3ForCausalLM(config)
    expected = {key: tensor.shape for key, tensor in model.state_dict().items()}
    problems = [f"unexpected tensor `{original_names[key]}`" for key in weights if key not in expected]
    problems += [f"no tensor for i3's `{key}`" for key in expected if key not in weights]
    problems += [
        f"`{original_names[key]}` has shape {tuple(weights[key].shape)}, expected {tuple(shape)}"
        for key, shape in expected.items()
        if key in weights and weights[key].shape != shape
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ConversionError(f"{path}: does not match the open-i3 layout its other tensors describe: {shown}.")
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def load_tokenizer(path: Path, vocab_size: int):
    """The tokenizer of `--vocab`: the i3-80M code's chunk vocab, or a `tokenizers` file (the i3-200M BPE)."""
    data = read_json(path)
    if "chunk_to_idx" in data:
        tokenizer = I3Tokenizer.from_open_i3_vocab(path)
    elif "model" in data:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(path), unk_token="<UNK>", pad_token="<PAD>", bos_token="<BOS>", eos_token="<EOS>"
        )
    else:
        raise ConversionError(f"{path}: is neither an open-i3 chunk vocab nor a `tokenizers` tokenizer.json.")
    if len(tokenizer) > vocab_size:
        raise ConversionError(f"{path}: has {len(tokenizer)} tokens, but the checkpoint embeds only {vocab_size}.")
    return tokenizer


# --- writing ---


def write_card(path: Path, model, tokenizer, name: str, checkpoint: Path):
    """README.md: what was converted from where, the layout, how to load it, and the attribution open-i3 asks for."""
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    mixer = model.config.recurrent_mixer
    conversion = (
        f"Converted by `convert_open_i3.py` from `{checkpoint.name}` (sha256 `{digest}`). Tensors were renamed to "
        "i3's module names (`embed` to `model.embed_tokens`, `layers.N.ln1` to `model.layers.N.input_layernorm`, "
        "`head` to `lm_head`, ...), and RWKV-v4 shift mixes, stored (1, 1, d) as the current token's share, became "
        "i3's (d,) `token_shift_*`, the previous token's share (1 - time_mix); the outputs are the original ones."
        + ("" if tokenizer is not None else " No tokenizer was converted (run the converter with `--vocab`).")
        + ("" if tokenizer is None or tokenizer.eos_token else " The published tokenizer lower-cases all text and has "
           "no end-of-text token: its chat template writes lower-case `role: content` lines and generation runs to "
           "`max_new_tokens`."))
    attribution = (
        f"The model code and weights come from [open-i3]({OPEN_I3_URL}) (Copyright 2025 FlameF0X & i3-lab). Its NOTICE "
        "asks anyone who uses, redistributes or modifies the code or the resulting weights to include a prominent "
        f"link back to {OPEN_I3_URL}.")
    write_model_card(
        path, model=model, tokenizer=tokenizer, name=name, repo=name, tags=["open-i3"],
        summary=f"A checkpoint of [open-i3]({OPEN_I3_URL}) converted to the i3 Transformers code: the same weights "
                f"and the same arithmetic (i3's `{mixer}` mixer is {PUBLISHED_MIXERS[mixer]}, exactly).",
        usage_note=f"The positions are learned and end at {model.config.max_position_embeddings}: a prompt plus "
                   "generated tokens longer than that raises a `ValueError`.",
        sections={"Conversion": conversion, "Attribution": attribution})


def write_folder(output_dir: Path, model, tokenizer, checkpoint: Path):
    """Assemble the folder under a temporary name next to `output_dir` and rename it at the end."""
    staging = output_dir.parent / f".{output_dir.name}.converting-{os.getpid()}"
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging)  # model.safetensors, config.json with auto_map, generation_config, code
        if tokenizer is not None:  # left padding, the i3 chat template unless it has one (open-i3's), positions
            apply_export_settings(tokenizer, model.config).save_pretrained(staging)
        write_card(staging / "README.md", model, tokenizer, output_dir.name, checkpoint)
        if output_dir.exists():
            output_dir.rmdir()  # empty: checked before converting
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def convert(args: argparse.Namespace):
    if args.output_dir.exists() and (not args.output_dir.is_dir() or any(args.output_dir.iterdir())):
        raise ConversionError(f"{args.output_dir}: already exists and is not an empty folder; nothing was written.")
    state, embedded_config = read_checkpoint(args.checkpoint)
    original, source = embedded_config, f"the config inside {args.checkpoint}"
    if args.config is not None:
        original, source = read_json(args.config), str(args.config)
    num_heads = args.num_heads if args.num_heads is not None else (original or {}).get("n_heads")
    config = infer_config(state, args.checkpoint, num_heads)
    if original is not None:
        cross_check(original, config, source)
    model = build_model(config, *to_i3_names(state, args.checkpoint), args.checkpoint)
    tokenizer = load_tokenizer(args.vocab, config.vocab_size) if args.vocab is not None else None
    write_folder(args.output_dir, model, tokenizer, args.checkpoint)
    logger.info(
        "Wrote %s: %s parameters, %s, layers %s.", args.output_dir, f"{model.num_parameters():,}",
        config.recurrent_mixer,
        "".join("R" if kind == "linear_attention" else "A" for kind in config.layer_types),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="original weights: pytorch_model.bin, checkpoint_best.pt or .safetensors")
    parser.add_argument("--output_dir", type=Path, required=True, help="folder to create (must not hold files)")
    parser.add_argument("--config", type=Path, help="the original config.json: heads, and a cross-check of the rest")
    parser.add_argument("--vocab", type=Path,
                        help="chunk_vocab_combined.json (i3-80M code) or tokenizer.json (i3-200M code)")
    parser.add_argument("--num_heads", type=int, help="attention heads, overriding --config and published defaults")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        convert(args)
    except ConversionError as error:
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    main()
