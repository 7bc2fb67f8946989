"""Export a trained or converted i3 folder to run without PyTorch: one ONNX graph of a decoding step (prefill and
decode alike) for ONNX Runtime, and optionally the same step as an ExecuTorch program (XNNPACK).

    python export.py MODEL_DIR OUTPUT_DIR [--executorch]

The step is `(input_ids, position_ids, attention_mask, past...) -> (logits, present...)`: every recurrent state and
every attention layer's keys and values is a named input `past.{layer}.{state}` and a named output
`present.{layer}.{state}`, with dynamic batch, sequence and past lengths. `attention_mask` (b, past + t) is 1 for
real tokens and 0 for left padding. An empty past is zero-length keys and values and each recurrent state's empty
value, saved in `empty_states.npz` (zeros, except the RWKV-v4 WKV exponent `pp`, which starts at -1e30). The
tokenizer files and `export_config.json` (names, shapes, limits) are written next to the graph.
"""

import argparse
import contextlib
import json
import operator
import sys
import unittest.mock
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from i3.run_exported import EMPTY_STATES_FILE, EXPORT_CONFIG_FILE, ONNX_FILE

EXECUTORCH_FILE = "model.pte"
ATTENTION_STATES = ("key", "value")
EXAMPLE_PAST = 3  # tokens of past in the example inputs that torch.export traces with


def load_model(model_dir: str | Path) -> nn.Module:
    """The i3 model of `model_dir` in float32, eval mode, with plain (exportable) SDPA attention."""
    model_type = AutoConfig.from_pretrained(model_dir, trust_remote_code=True).model_type
    if model_type != "i3":
        raise ValueError(f"this exporter takes i3 models, not model_type {model_type!r}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return model.eval()


def modeling_module(model: nn.Module):
    """The `modeling_i3` module the model was loaded from (remote code lives in its own copy of the file)."""
    return sys.modules[type(model).__module__]


def state_names(model: nn.Module) -> list[tuple[int, str]]:
    """(layer, state) for every input of the past, in graph order: a prefill of one token through the eager model
    reveals which named states each recurrent layer keeps; attention layers keep keys and values."""
    cache = modeling_module(model).I3Cache(model.config)
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    names = []
    for layer_idx, layer_type in enumerate(model.config.layer_types):
        if layer_type == "full_attention":
            names += [(layer_idx, name) for name in ATTENTION_STATES]
        else:
            names += [(layer_idx, name) for name in sorted(cache.recurrent_states(layer_idx).states)]
    return names


def empty_states(model: nn.Module, batch: int = 1) -> list[torch.Tensor]:
    """The past before the first token, in `state_names` order: zero-length keys and values, and every recurrent
    state as the mixers start it (zeros, and the empty WKV sums, whose exponent is -1e30, not 0)."""
    modeling = modeling_module(model)
    cache = modeling.I3Cache(model.config)
    with torch.no_grad():
        model(torch.zeros(batch, 1, dtype=torch.long), cache=cache)
    empty = []
    for layer_idx, name in state_names(model):
        layer = cache.layers[layer_idx]
        if name in ATTENTION_STATES:
            empty.append(getattr(layer, f"{name}s")[:, :, :0])
        elif name == "wkv":
            empty.append(modeling.wkv_empty_state(layer.states[name][:, 0]))
        else:
            empty.append(torch.zeros_like(layer.states[name]))
    return empty


def fill_cache(cache, names, past):
    """Put the `past` tensors (in `names` order) into a fresh cache: keys and values into its attention layers,
    named states into its recurrent layers. The benchmark fills a transformers `DynamicCache` the same way."""
    past = dict(zip(names, past))
    for (layer_idx, name), state in past.items():
        if name == "key":
            cache.layers[layer_idx].update(state, past[(layer_idx, "value")])
        elif name != "value":
            cache.recurrent_states(layer_idx).states[name] = state
    return cache


def cache_contents(cache, names) -> list[torch.Tensor]:
    """The cache's tensors in `names` order (what `fill_cache` takes)."""
    return [getattr(cache.layers[layer_idx], f"{name}s") if name in ATTENTION_STATES
            else cache.recurrent_states(layer_idx).states[name] for layer_idx, name in names]


class I3Step(nn.Module):
    """One step of an i3 model with its past as tensors: builds an `I3Cache` from them, runs the model, and returns
    the logits and the cache's new contents in the same order. `attention_mask` None means every token is real (the
    ExecuTorch program, whose runtime has no kernel for the stable sort that keeps padded steps out of the recurrent
    layers' history)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names = state_names(model)

    def forward(self, input_ids, position_ids, attention_mask, *past):
        cache = fill_cache(modeling_module(self.model).I3Cache(self.model.config), self.names, past)
        cache.seen_tokens = past_length(self.names, past)
        logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache).logits
        return (logits, *cache_contents(cache, self.names))


def past_length(names, past) -> int:
    """How many tokens the past holds (what attention masks follow): the keys' length; 0 without attention, where
    nothing reads it (positions are inputs)."""
    return next((state.shape[2] for (_, name), state in zip(names, past) if name == "key"), 0)


def input_names(names) -> list[str]:
    return ["input_ids", "position_ids", "attention_mask"] + [f"past.{layer}.{name}" for layer, name in names]


def output_names(names) -> list[str]:
    return ["logits"] + [f"present.{layer}.{name}" for layer, name in names]


def example_inputs(model: nn.Module, batch: int = 2, past: int = EXAMPLE_PAST):
    """Inputs of a step that continues `past` tokens with new ones (what torch.export traces; any sizes run).

    The new tokens fill three chunks of the chunked scans, where the learned positions allow: traced at one chunk,
    torch.export takes the chunk count for the constant 1 (its sizes 0 and 1 are specialised), and longer prompts
    would not run."""
    config = model.config
    new = 2 * config.chunk_size + 3
    if config.position_embedding_type == "learned":
        new = min(new, config.max_position_embeddings - past)
    ids = torch.randint(0, model.config.vocab_size, (batch, past + new), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(past + new)[None].expand(batch, -1)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    with torch.no_grad():
        _, *states = I3Step(model)(ids[:, :past], positions[:, :past], mask[:, :past], *empty_states(model, batch))
    states = [state.contiguous() for state in states]  # as a runtime hands them over (torch.scan checks strides)
    return (ids[:, past:], positions[:, past:], mask, *states)


def dynamic_shapes(names) -> tuple:
    """Batch, new tokens and past length are dynamic (the mask's length is their sum, which torch.export works out
    itself, hence DYNAMIC rather than named dimensions); recurrent states have only the batch dimension free."""
    dynamic = torch.export.Dim.DYNAMIC
    past_shapes = tuple({0: dynamic, 2: dynamic} if name in ATTENTION_STATES else {0: dynamic} for _, name in names)
    return ({0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}, past_shapes)


def stable_sort(self, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable as ONNX TopK over the whole axis: TopK breaks ties by the lower index, so it is stable. The
    padding masks i3 sorts are int8, which ONNX Runtime's TopK does not take: they are sorted as int32."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    keys = op.Cast(self, to=ir.DataType.INT32) if self.dtype in (ir.DataType.INT8, ir.DataType.BOOL) else self
    length = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    values, indices = op.TopK(keys, length, axis=dim, largest=descending, sorted=True)
    return op.CastLike(values, self), indices


def scan_of_steps(step, num_sequences: int):
    """A chunked scan's export twin: its single-step twin (`step`, tested equal to it) applied over time by
    `torch.scan`, which ONNX keeps as one Scan node. The chunked scans of the published mixers carry the state across
    chunks in a Python loop whose length depends on the sequence length, which one graph for every length cannot do.

    Takes the chunked scan's arguments: (b, t, ...) sequences, then constants, `chunk_size` (unused) and the state."""
    from torch._higher_order_ops import scan

    def evaluate(*arguments, chunk_size, initial_state):
        sequences, constants = arguments[:num_sequences], arguments[num_sequences:]

        def one_step(state, inputs):
            output, state = step(*(x[:, None] for x in inputs), *constants, initial_state=state)
            return state, output[:, 0].clone()  # the LTI step returns its state as the output: no aliasing

        final_state, outputs = scan(one_step, initial_state.float(), [x.float() for x in sequences], dim=1)
        return outputs, final_state

    return evaluate


@contextlib.contextmanager
def exportable(model: nn.Module):
    """Swap in what one graph for every length needs, for the duration of an export:
    - the open-i3 and RWKV-v4 chunked scans by their single-step twins under `torch.scan` (see `scan_of_steps`);
    - no padding check in those mixers: it raises on data (a graph cannot), and with the past always given it would
      take left padding of a new sequence for padding inside a continuation. Zero inputs keep a zero LTI state zero,
      and a padded WKV key of -1e30 weighs nothing once a real token arrives, so left padding is exact;
    - no check of learned positions against their table (a data-dependent raise too): the runtime refuses prompts
      that would pass `max_position_embeddings` (written to export_config.json).
    The i3 mixer exports as it is."""
    modeling = modeling_module(model)
    replacements = [
        (modeling, "lti_scan_chunked", scan_of_steps(modeling.lti_scan_step, 1)),
        (modeling, "wkv4_scan_chunked", scan_of_steps(modeling.wkv4_scan_step, 2)),
        (modeling, "check_padding_keeps_state", lambda *arguments: None),
        (modeling.I3Model, "check_learned_positions", lambda self, position_ids: position_ids),
    ]
    with contextlib.ExitStack() as stack:
        for owner, name, replacement in replacements:
            stack.enter_context(unittest.mock.patch.object(owner, name, replacement))
        yield


def export_onnx(model: nn.Module, path: Path):
    """The ONNX graph of `I3Step`, every size dynamic (ONNX Runtime optimises it further when it loads)."""
    step, inputs = I3Step(model).eval(), example_inputs(model)
    with exportable(model):
        save_onnx(step, inputs, step.names, path)


def save_onnx(step: nn.Module, inputs: tuple, names, path: Path):
    """torch.onnx.export (dynamo) of a step `(input_ids, position_ids, attention_mask, *past)` whose past holds
    `names`; the benchmark exports a Llama through here too."""
    with torch.no_grad():
        program = torch.onnx.export(
            step, inputs, dynamo=True, input_names=input_names(names), output_names=output_names(names),
            dynamic_shapes=dynamic_shapes(names), custom_translation_table={torch.ops.aten.sort.stable: stable_sort},
            optimize=True,
        )
    program.save(str(path))


def lerp_as_aten_computes_it(start, end, weight):
    """torch.lerp (the token shift) in ATen's own arithmetic: its default decomposition leaves a strided copy that
    ExecuTorch has no kernel for."""
    difference = end - start
    return torch.where(weight.abs() < 0.5, start + weight * difference, end - difference * (1 - weight))


def with_python_modulo(graph_module: torch.fx.GraphModule):
    """ExecuTorch's runtime takes `a % b` of sizes with C's sign (that of a), Python's has b's: the chunked scans pad
    by `-length % chunk_size`, which must not turn negative. Rewrite every size modulo as `(a % b + b) % b`."""
    graph = graph_module.graph
    for node in [node for node in graph.nodes if node.op == "call_function" and node.target is operator.mod]:
        divisor = node.args[1]
        divisor_value = divisor.meta["val"] if isinstance(divisor, torch.fx.Node) else divisor
        with graph.inserting_after(node):
            shifted = graph.call_function(operator.add, (node, divisor))
            shifted.meta["val"] = node.meta["val"] + divisor_value
        with graph.inserting_after(shifted):
            remainder = graph.call_function(operator.mod, (shifted, divisor))
            remainder.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(remainder, delete_user_cb=lambda user: user is not shifted)
    graph_module.recompile()


def export_executorch(model: nn.Module, path: Path, max_tokens: int = 4096):
    """The same step as an ExecuTorch program for XNNPACK, at batch 1 and without the attention mask (see `I3Step`).
    XNNPACK reshapes take one dynamic dimension, where i3's reshape over new tokens and past together: batch is fixed
    at 1 and reshapes stay on ExecuTorch's portable kernels (matmuls and elementwise math go to XNNPACK). ExecuTorch
    plans memory for the largest sizes, so new tokens and past are bounded by `max_tokens` (or the learned
    positions). Its inputs are `(input_ids, position_ids, None, *past)`: the mask's slot stays, empty."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import (
        UnsqueezeCopyConfig,
        ViewCopyConfig,
    )
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if model.config.position_embedding_type == "learned":
        max_tokens = min(max_tokens, model.config.max_position_embeddings)
    step = I3Step(model).eval()
    ids, positions, _, *past = example_inputs(model, batch=1)
    tokens = torch.export.Dim.DYNAMIC(max=max_tokens)
    shapes = ({1: tokens}, {1: tokens}, None,
              tuple({2: tokens} if name in ATTENTION_STATES else {} for _, name in step.names))
    with exportable(model), torch.no_grad():
        program = torch.export.export(step, (ids, positions, None, *past), dynamic_shapes=shapes)
    program = program.run_decompositions({torch.ops.aten.lerp.Tensor: lerp_as_aten_computes_it})
    with_python_modulo(program.graph_module)
    partitioner = XnnpackPartitioner(configs=[config for config in ALL_PARTITIONER_CONFIGS
                                              if config not in (UnsqueezeCopyConfig, ViewCopyConfig)])
    path.write_bytes(to_edge_transform_and_lower(program, partitioner=[partitioner]).to_executorch().buffer)


def export_config(model: nn.Module, names) -> dict:
    """What a runtime needs besides the graph: state names, special tokens, and the longest sequence."""
    config = model.config
    generation = model.generation_config
    learned = config.position_embedding_type == "learned"
    return {
        "past_names": input_names(names)[3:],
        "present_names": output_names(names)[1:],
        "vocab_size": config.vocab_size,
        "eos_token_id": generation.eos_token_id if generation.eos_token_id is not None else config.eos_token_id,
        "pad_token_id": next((token for token in (generation.pad_token_id, config.pad_token_id, 0) if token is not None)),
        "max_length": config.max_position_embeddings if learned else None,
        "recurrent_mixer": config.recurrent_mixer,
        "layer_types": config.layer_types,
        "dtype": "float32",
    }


def write_runtime_files(model: nn.Module, output_dir: Path):
    """What ONNX Runtime needs besides the tokenizer: the step graph, the empty states and export_config.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    names = state_names(model)
    empty = {name: state.numpy() for name, state in zip(input_names(names)[3:], empty_states(model))}
    np.savez(output_dir / EMPTY_STATES_FILE, **empty)
    (output_dir / EXPORT_CONFIG_FILE).write_text(json.dumps(export_config(model, names), indent=2) + "\n")
    export_onnx(model, output_dir / ONNX_FILE)


def export(model_dir: str | Path, output_dir: str | Path, executorch: bool = False):
    """Write the ONNX step (and the ExecuTorch program), the empty states, the export config and the tokenizer."""
    output_dir = Path(output_dir)
    model = load_model(model_dir)
    if executorch and model.config.recurrent_mixer != "i3":
        raise ValueError(f"the ExecuTorch program takes the i3 mixer, not {model.config.recurrent_mixer!r}, whose scan "
                         "exports as torch.scan, which ExecuTorch does not run (export without --executorch for ONNX)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    write_runtime_files(model, output_dir)
    tokenizer.save_pretrained(output_dir)
    if executorch:
        export_executorch(model, output_dir / EXECUTORCH_FILE)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="an i3 folder: written by train.py, convert_open_i3.py or save_pretrained")
    parser.add_argument("output_dir")
    parser.add_argument("--executorch", action="store_true", help="also write model.pte (ExecuTorch, XNNPACK)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        export(args.model_dir, args.output_dir, args.executorch)
    except Exception as error:  # noqa: BLE001 -- one line for the user; the traceback helps nobody here
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        sys.exit(f"export.py: cannot export {args.model_dir}: {first_line}")


if __name__ == "__main__":
    main()
