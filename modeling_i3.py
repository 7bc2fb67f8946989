"""i3: a hybrid language model with recurrent layers at the bottom and causal attention on top.

The stack is `config.layer_types`, bottom to top: `"linear_attention"` layers hold a recurrent mixer, and
`"full_attention"` layers hold multi-head attention (the i3-80M layout is 10 recurrent + 6 attention). Every
layer is pre-norm residual: `x = x + mixer(norm1(x)); x = x + ffn(norm2(x))`.

The recurrent mixer is `config.recurrent_mixer` (the math of each: docs/design.md#recurrent-mixers):
  - `"i3"` (2.1): RWKV token shift, causal conv, and a selective state space model with one scalar decay per head
    (Mamba-2 form), gated by a SiLU branch. The default for new models.
  - `"open-i3"` (2.2): the linear time-invariant mixer of the published i3-80M code, exactly.
  - `"rwkv4"` (2.3): the RWKV-v4 time-mix of the published i3-200M code, exactly, with its channel-mix as the
    feed-forward.
Every recurrence has a chunked evaluation (training and prefill: matmuls inside chunks, a short scan across chunk
states) and a single-step twin (decoding from the cache); tests check both against plain loops.

Index letters in the scans: b batch, t time, h heads, p head size, n state size, d width; in chunked form
c chunk, l and s positions inside a chunk (l the output, s the source).
"""

import functools
import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_i3 import I3Config

# --- the cache: i3 owns its recurrent states and its token count ---
#
# transformers rebuilds its recurrent cache layers from one release to the next (5.25 changed which layer reports the
# cached length, and counts tokens by the width of the conv states it is handed). i3 keeps what it must own here: each
# recurrent layer's states in `RecurrentStates`, and the number of cached tokens in `I3Cache`, from which positions and
# masks follow. Attention keys and values stay in transformers' public `DynamicLayer` / `StaticLayer`.
# What `generate` asks of the cache, on every supported release (5.24, 5.25): `get_seq_length`, `get_mask_sizes`,
# `crop` with minus the tokens to remove, `activate_past_recording` (5.25 passes how many tokens a rollback may undo,
# 5.24 passes nothing), and the batch reordering of beam search. No layer reports itself as transformers'
# linear-attention layer (`Cache.is_linear`): 5.24 takes such a cache for one that cannot count its tokens and feeds
# it the whole sequence again when an assistant restarts from it.


class RecurrentStates:
    """One recurrent layer's states, by the names its mixer gives them (the `i3` mixer's "shift", "conv" and "ssm",
    say). A missing state means the sequence has not started: the mixer starts from zeros.

    Rolling back (assisted generation and prompt lookup reject draft tokens): while recording, every update also keeps
    the state after each token, so `roll_back(n)` can restore the state from n tokens ago. `in_place` states (those of
    static caches) keep their first buffers and are overwritten, so that a compiled decoding step reads and writes the
    same memory at every token."""

    is_sliding = False
    supports_early_init = False
    is_initialized = True

    def __init__(self, in_place: bool = False):
        self.in_place = in_place
        self.states: dict[str, torch.Tensor] = {}
        self.history: dict[str, list[torch.Tensor | None]] | None = None  # per name, oldest first; None: not recording
        self.tokens_to_keep: int | None = None

    @property
    def recording(self) -> bool:
        return self.history is not None

    @property
    def is_croppable(self) -> bool:
        return self.recording

    @property
    def is_compileable(self) -> bool:
        return self.in_place and not self.recording

    def get(self, name: str) -> torch.Tensor | None:
        return self.states.get(name)

    def update(self, name: str, state: torch.Tensor, per_token: torch.Tensor | None = None):
        """Keep `state`, the state after the last token; while recording, `per_token` (t, ...) holds the state after
        each token of this forward (its last entry is `state`)."""
        if self.recording:
            if per_token is None:
                raise RuntimeError(f"recording recurrent state {name!r} needs the state after every token")
            history = self.history.setdefault(name, [self.states.get(name)])
            history.extend(per_token.unbind(0))
            if self.tokens_to_keep is not None:
                del history[: -self.tokens_to_keep - 1]
        buffer = self.states.get(name)
        if self.in_place and not self.recording and buffer is not None and buffer.shape == state.shape:
            buffer.copy_(state)
        else:
            self.states[name] = state

    def start_recording(self, tokens_to_keep: int | None):
        self.history = {name: [state] for name, state in self.states.items()}
        self.tokens_to_keep = tokens_to_keep

    def roll_back(self, tokens: int):
        """Restore every state to what it was `tokens` tokens ago, then record afresh from there."""
        if tokens and not self.recording:
            raise ValueError("Recurrent states roll back only while recording: call `cache.activate_past_recording()` "
                             "before the tokens that may be removed.")
        for name, history in (self.history or {}).items():
            if tokens >= len(history):
                raise ValueError(f"Cannot roll back {tokens} tokens: the recurrent states recorded {len(history) - 1}.")
            state = history[-1 - tokens]
            if state is None:
                self.states.pop(name, None)
            else:
                self.states[name] = state
            self.history[name] = [state]

    def map_states(self, function):
        """Apply `function` to every state (batch reordering, repetition, selection)."""
        self.states = {name: function(state) for name, state in self.states.items()}
        if self.recording:
            self.history = {name: [None if s is None else function(s) for s in history]
                            for name, history in self.history.items()}

    def reset(self):
        self.states = {}
        if self.recording:
            self.history = {}

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.map_states(lambda state: state.index_select(0, beam_idx.to(state.device)))

    def batch_repeat_interleave(self, repeats: int):
        self.map_states(lambda state: state.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self.map_states(lambda state: state[indices])

    def get_max_length(self) -> int:
        return -1


def check_cache(cache: Cache | None):
    """Only an `I3Cache` knows where i3's recurrent states and token count live: refuse any other cache clearly."""
    if cache is not None and not isinstance(cache, I3Cache):
        raise TypeError(
            f"i3 models keep their recurrent states in an `I3Cache`, not a {type(cache).__name__}: pass "
            "`cache=I3Cache(model.config)` (from this model's modeling_i3 module), or `use_cache=True` and reuse the "
            "returned `outputs.cache`."
        )


class I3Cache(Cache):
    """The cache of an i3 model: transformers' key/value layers for attention (`DynamicLayer`, or `StaticLayer` when
    `max_cache_len` is given), `RecurrentStates` for recurrent layers, and the number of tokens seen.

    `generate` and `use_cache=True` create one; pass one yourself as `cache=I3Cache(model.config)`."""

    def __init__(self, config: I3Config, max_cache_len: int | None = None):
        static = max_cache_len is not None

        def layer_cache(layer_type: str):
            if layer_type != "full_attention":
                return RecurrentStates(in_place=static)
            return StaticLayer(max_cache_len=max_cache_len) if static else DynamicLayer()

        super().__init__(layers=[layer_cache(layer_type) for layer_type in config.layer_types])
        self.max_cache_len = max_cache_len
        # tokens seen, counted by `I3Model.forward`; a static cache counts in a tensor, updated in place, so that a
        # compiled step reads it as data rather than recompiling for every new value
        self.seen_tokens = torch.tensor(0) if static else 0

    def recurrent_states(self, layer_idx: int) -> RecurrentStates:
        return self.layers[layer_idx]

    @property
    def recording(self) -> bool:
        return any(layer.recording for layer in self.layers if isinstance(layer, RecurrentStates))

    def get_seq_length(self, layer_idx: int | None = 0) -> int | torch.Tensor:
        return self.seen_tokens

    def count(self, tokens: int):
        if isinstance(self.seen_tokens, torch.Tensor):
            self.seen_tokens.add_(tokens)
        else:
            self.seen_tokens += tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int | None = 0) -> tuple[int, int]:
        """(keys length, offset) of the attention masks: the static length, or the tokens seen plus the new ones."""
        if self.max_cache_len is not None:
            return self.max_cache_len, 0
        return self.seen_tokens + query_length, 0

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs):
        """Start keeping what `crop` needs to undo tokens. transformers 5.25 says how many tokens a rollback may
        remove; 5.24 does not (then everything since this call is kept, until the next `crop`)."""
        for layer in self.layers:
            if isinstance(layer, RecurrentStates):
                layer.start_recording(recurrent_states_to_keep)

    def crop(self, tokens_to_remove: int):
        """Remove the last `-tokens_to_remove` tokens (transformers passes a negative count; 0 removes nothing)."""
        if tokens_to_remove > 0:
            raise ValueError(f"`crop` takes minus the number of tokens to remove, got {tokens_to_remove}.")
        for layer in self.layers:
            if isinstance(layer, RecurrentStates):
                layer.roll_back(-tokens_to_remove)
            elif tokens_to_remove:
                layer.crop(tokens_to_remove)
        self.count(tokens_to_remove)

    def reset(self):
        super().reset()
        if self.max_cache_len is not None:
            self.seen_tokens.zero_()
        else:
            self.seen_tokens = 0

    @property
    def is_compileable(self) -> bool:
        return self.max_cache_len is not None and super().is_compileable


# --- small pieces ---


# Activations as plain torch functions: transformers' activation modules can be swapped for Hub kernels
# (`from_pretrained(use_kernels=True)`, the default from 5.25), which would change i3's numerics unasked.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class I3LowRankLinear(nn.Module):
    """A linear layer factorised through rank r, `y = x (A B)^T + b` (docs/design.md#low-rank-linear-layers)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.A = nn.Parameter(torch.empty(out_features, rank))
        self.B = nn.Parameter(torch.empty(rank, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(hidden_states, self.B), self.A, self.bias)


def make_linear(config: I3Config, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """An `nn.Linear`, or its low-rank factorisation when `config.low_rank` is set."""
    if config.low_rank is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return I3LowRankLinear(in_features, out_features, config.low_rank, bias=bias)


class I3GatedRMSNorm(nn.Module):
    """`weight * rmsnorm(y) * silu(z)`: normalises the SSM output before the SiLU gate (step 5 of
    docs/design.md#the-i3-mixer)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(hidden_states.float(), hidden_states.shape[-1:], self.weight.float(), self.eps)
        return normed.to(gate.dtype) * F.silu(gate)


class I3RotaryEmbedding(nn.Module):
    """Rotary position embedding for the attention layers (transformers' `_init_weights` rebuilds `inv_freq`)."""

    def __init__(self, config: I3Config):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = ROPE_INIT_FUNCTIONS.get(self.rope_type, self.compute_default_rope_parameters)
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: I3Config, **kwargs) -> tuple[torch.Tensor, float]:
        """The original RoPE frequencies, theta^(-2i/p), with no attention scaling."""
        base = config.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, config.head_dim, 2, dtype=torch.float) / config.head_dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotate queries and keys (b, h, t, p) by their positions' angles (b, t, p)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class I3MLP(nn.Module):
    """The feed-forward of attention layers and of `i3` / `open-i3` recurrent layers: `down(act(up(x)))`, or with
    `gated_mlp` `down(act(gate(x)) * up(x))` (SwiGLU with `hidden_act="silu"`, as in Llama)."""

    def __init__(self, config: I3Config):
        super().__init__()
        self.gate_proj = (make_linear(config, config.hidden_size, config.intermediate_size, config.mlp_bias)
                          if config.gated_mlp else None)
        self.up_proj = make_linear(config, config.hidden_size, config.intermediate_size, config.mlp_bias)
        self.act_fn = ACTIVATIONS[config.hidden_act]
        self.down_proj = make_linear(config, config.intermediate_size, config.hidden_size, config.mlp_bias)

    def forward(self, hidden_states: torch.Tensor, **token_mixing_inputs) -> torch.Tensor:
        """`token_mixing_inputs` (mask, states) are for the RWKV channel-mix that can stand in this place."""
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(hidden_states)))
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


# --- cache and padding helpers shared by the recurrent mixers ---


def padding_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """The (b, t) padding mask of the current tokens for the recurrent layers, or None when nothing is padded (or the
    mask is a prepared 4D one, which carries no padding of its own)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    attention_mask = attention_mask[:, -seq_len:]
    if not torch.compiler.is_compiling() and bool(attention_mask.all()):  # compiled graphs keep one branch
        return None
    return attention_mask


def zero_padding(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the (b, t, ...) inputs at padded positions so that padding never reaches a recurrent state (`where`, not a
    product, so that a NaN or inf in a padded position stays out too)."""
    if attention_mask is None:
        return hidden_states
    mask = attention_mask.bool().view(*attention_mask.shape, *([1] * (hidden_states.dim() - 2)))
    return torch.where(mask, hidden_states, torch.zeros((), dtype=hidden_states.dtype, device=hidden_states.device))


def with_history(
    x: torch.Tensor, history_length: int, attention_mask: torch.Tensor | None, states: RecurrentStates | None,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(b, d, t) -> (b, d, history_length + t): `x` preceded by the `history_length` real inputs before it (zeros
    before the sequence start), continuing from the cached state `name` and leaving there the last `history_length`
    real inputs. A token shift keeps 1 input, a causal conv of kernel K keeps K - 1.

    A padded step must enter nobody's history, wherever it sits (left, right, or inside a continuation): when there
    is a mask, each row is stably sorted so that its padded steps come first, ahead of the history, and the real steps
    follow in their order. The second result is that order (None without a mask), for `restore_order`."""
    history = states.get(name) if states is not None else None
    history = x.new_zeros(*x.shape[:-1], history_length) if history is None else history.to(x.dtype)
    sequence = torch.cat([history, x], dim=-1)
    order = None
    if attention_mask is not None:
        is_real = torch.cat([attention_mask.new_ones(x.shape[0], history_length), attention_mask], dim=-1).bool()
        order = torch.argsort(is_real.to(torch.int8), dim=-1, stable=True)  # (b, history + t), padded steps first
        sequence = sequence.gather(-1, order[:, None].expand_as(sequence))
    if states is not None:  # while recording, the window after each step: (t, b, d, history_length)
        per_token = sequence.unfold(-1, history_length, 1)[..., 1:, :].movedim(-2, 0) if states.recording else None
        states.update(name, sequence[..., -history_length:], per_token)
    return sequence, order


def restore_order(outputs: torch.Tensor, order: torch.Tensor | None, history_length: int) -> torch.Tensor:
    """(b, d, t) outputs computed on a `with_history` sequence (output s belongs to its step `history_length + s`),
    put back in the order of the steps. Padded steps receive arbitrary values: callers zero them."""
    if order is None:
        return outputs
    sorted_position = torch.argsort(order, dim=-1)[:, history_length:]  # (b, t): where each step went
    return outputs.gather(-1, (sorted_position - history_length).clamp(min=0)[:, None].expand_as(outputs))


def token_shift(current: torch.Tensor, previous: torch.Tensor, past_weight: torch.Tensor) -> torch.Tensor:
    """RWKV token shift, `current + past_weight * (previous - current)`: every mixer's shift weight is the share of
    the previous token (0 keeps the current token, 1 takes the previous one)."""
    return torch.lerp(current, previous, past_weight)


def previous_tokens(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, states: RecurrentStates | None, name: str
) -> torch.Tensor:
    """(b, t, d) -> (b, t, d): the previous real token x_{t-1} for every t (RWKV token shift), continuing from the
    cached state `name`."""
    history, order = with_history(hidden_states.transpose(1, 2), 1, attention_mask, states, name)
    return restore_order(history[..., :-1], order, 1).transpose(1, 2)


def check_padding_keeps_state(attention_mask: torch.Tensor | None, continuing: bool, keeps_state: bool, mixer: str):
    """The `open-i3` and `rwkv4` scans decay their state at every step, input or not, so a padded step is harmless
    only where the state is still empty (left padding of a new sequence) or where nothing reads the state afterwards
    (right padding without a cache). Refuse every other mask rather than compute a wrong state."""
    if attention_mask is None:
        return
    is_real = attention_mask.bool()
    state_is_live = (is_real.cumsum(-1) > 0) | continuing
    real_follows = is_real.flip(-1).cumsum(-1).flip(-1) > is_real.long()
    if ((~is_real) & state_is_live & (real_follows | keeps_state)).any():
        raise ValueError(
            f"The `{mixer}` recurrent mixer decays its state at every step, so it accepts padding only before the "
            "first token of a new sequence (left padding), or after the last one when no cache is kept. This "
            "attention_mask pads after real tokens or inside a continuation: pad on the left, or call without a cache."
        )


# --- packed documents: position ids that restart mark where a document starts ---

# a log-decay whose exp is exactly 0 in float32: the state before a document start is dropped
LOG_DECAY_AT_DOCUMENT_START = -1e4


def find_document_starts(position_ids: torch.Tensor, attention_mask, cache: Cache | None) -> torch.Tensor | None:
    """(b, t) True where a new document starts inside a packed row, by transformers' own rule (position ids that do
    not step by one, as padding-free collators produce; only without a padding mask or a cache), or None."""
    if attention_mask is not None or cache is not None or position_ids.shape[-1] < 2:
        return None
    segments = find_packed_sequence_indices(position_ids)
    if segments is None:
        return None
    return torch.diff(segments, prepend=segments[:, :1], dim=-1) != 0


def conv_within_documents(sequence: torch.Tensor, conv: nn.Conv1d, starts: torch.Tensor) -> torch.Tensor:
    """The causal depthwise `conv` over a `with_history` sequence (b, d, K - 1 + t) -> (b, d, t), where no window
    reaches back across a document start: each window's inputs from an earlier document count as zeros."""
    kernel = conv.kernel_size[0]
    windows = sequence.unfold(-1, kernel, 1)  # (b, d, t, K): inputs t - K + 1 .. t
    document = F.pad(starts.long().cumsum(-1), (kernel - 1, 0)).unfold(-1, kernel, 1)  # (b, t, K)
    same_document = (document == document[..., -1:]).to(sequence.dtype)[:, None]  # (b, 1, t, K)
    return torch.einsum("bdtk,dk->bdt", windows * same_document, conv.weight[:, 0]) + conv.bias[:, None]


# --- optional CUDA kernels ---
#
# On CUDA, flash-linear-attention's `chunk_simple_gla` computes the i3 SSM (one scalar decay per head and step) and
# causal-conv1d the causal depthwise conv. Both are optional and looked up by name on the first call from a CUDA tensor:
# remote code is copied flat into the Hub cache, and transformers refuses a model file whose plain imports are missing.
# Wherever a kernel is not installed or the tensors are elsewhere, the pure-torch path below runs.

KERNEL_DEVICES = ("cuda",)  # device types the optional kernels run on
CONV_KERNEL = ("causal_conv1d", "causal_conv1d_fn")
SSM_KERNEL = ("fla.ops.simple_gla", "chunk_simple_gla")


@functools.cache
def import_optional(module: str, name: str) -> Callable | None:
    """`module.name` if that package is installed and imports, else None (looked up once)."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 -- not installed, or installed without what it needs (triton, a CUDA build)
        return None


def optional_kernel(tensor: torch.Tensor, kernel: tuple[str, str]) -> Callable | None:
    """The optional `kernel` (module, name) for `tensor`: installed and on a device it runs on, else None."""
    return import_optional(*kernel) if tensor.device.type in KERNEL_DEVICES else None


def causal_depthwise_conv(sequence: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """The depthwise `conv` over a `with_history` sequence, (b, d, K - 1 + t) -> (b, d, t): causal-conv1d where it
    runs, one dot product per channel for a single step (decoding: far cheaper than a conv call), else the conv."""
    kernel_size = conv.kernel_size[0]
    kernel = optional_kernel(sequence, CONV_KERNEL)
    if kernel is not None:  # it pads K - 1 zeros on the left itself: drop the outputs that would read them
        weight, bias = conv.weight[:, 0].to(sequence.dtype), conv.bias.to(sequence.dtype)
        return kernel(sequence.contiguous(), weight, bias)[..., kernel_size - 1 :]
    if sequence.shape[-1] == kernel_size:
        return (sequence * conv.weight[:, 0]).sum(-1, keepdim=True) + conv.bias[:, None]
    return conv(sequence)


# --- scan helpers shared by the chunked scans ---


def without_autocast(tensor: torch.Tensor):
    """The scans accumulate in float32: keep autocast from running their einsums in half precision."""
    return torch.autocast(tensor.device.type, enabled=False)


def split_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(b, t, ...) -> (b, c, l, ...), zero-padding t up to a multiple of `chunk_size`.

    The padded steps come after the last real one, so they never reach a real output; each scan keeps them out of
    the final state too (i3: log-decay 0 and input 0; open-i3: the state is read at the last real step; WKV: the
    keys are padded with an empty weight before this call)."""
    pad = -x.shape[1] % chunk_size
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.reshape(x.shape[0], -1, chunk_size, *x.shape[2:])


def segment_sum(log_decay: torch.Tensor) -> torch.Tensor:
    """(..., l) -> (..., l, s): the log-decay from step s to step l, `sum_{s < k <= l} log_decay[k]`, and -inf
    above the diagonal (s > l), so that `exp` of it is the causal decay matrix.

    Each entry sums only its own terms (not a difference of two long cumulative sums), so a short segment late in a
    long sequence keeps full float32 precision."""
    length = log_decay.shape[-1]
    terms = log_decay[..., :, None].expand(*log_decay.shape, length)  # terms[l, s] = log_decay[l]
    ones = torch.ones(length, length, dtype=torch.bool, device=log_decay.device)
    segments = torch.cumsum(terms.masked_fill(~ones.tril(-1), 0), dim=-2)
    return segments.masked_fill(~ones.tril(0), -torch.inf)


def scan_step_by_step(step, sequences, constants, initial_state):
    """Run a scan's single-step twin over every step of the (b, t, ...) `sequences`: the outputs (b, t, ...) and the
    state after each step (t, ...). A cache that is recording (to roll back rejected draft tokens) needs those."""
    outputs, states = [], []
    state = initial_state
    for t in range(sequences[0].shape[1]):
        output, state = step(*(sequence[:, t : t + 1] for sequence in sequences), *constants, initial_state=state)
        outputs.append(output)
        states.append(state)
    return torch.cat(outputs, dim=1), torch.stack(states)


# --- i3 selective SSM (docs/design.md#the-i3-mixer) ---
#
# Per head h, with inputs u_t (p), step dt_t > 0, log-decay log_a_t = -exp(A_log) * dt_t, and shared B_t, C_t (n):
#   S_t = exp(log_a_t) * S_{t-1} + dt_t * u_t (outer) B_t          S: (p, n)
#   y_t = S_t C_t + D * u_t
# The chunked form splits time into chunks of l steps. Inside a chunk, y is a masked matmul weighted by decays
# (the "diagonal block"); across chunks only the states at chunk ends are carried, itself a tiny scan of length c.


def i3_scan_chunked(u, dt, log_a, B, C, D, *, chunk_size, initial_state=None):
    """Chunked evaluation of the i3 SSM (training and prefill).

    u: (b, t, h, p); dt, log_a: (b, t, h); B, C: (b, t, n); D: (h); initial_state: (b, h, p, n) or None.
    Returns y (b, t, h, p) in u's dtype and the final state (b, h, p, n) in float32.
    """
    batch, seq_len, num_heads, head_dim = u.shape
    # accumulate in float32: exp of cumulative log-decays is too coarse in half precision
    x = split_chunks((u * dt[..., None]).float(), chunk_size)  # (b, c, l, h, p), the input dt_t u_t
    log_a = split_chunks(log_a.float(), chunk_size).permute(0, 3, 1, 2)  # (b, h, c, l)
    B = split_chunks(B.float(), chunk_size)  # (b, c, l, n)
    C = split_chunks(C.float(), chunk_size)  # (b, c, l, n)
    cumulative = torch.cumsum(log_a, dim=-1)  # (b, h, c, l): log-decay from the chunk start to step l

    # 1. inside chunks: y_l = sum_{s <= l} exp(log-decay s -> l) (C_l . B_s) x_s
    decay = torch.exp(segment_sum(log_a))  # (b, h, c, l, s)
    scores = torch.einsum("bcln,bcsn->bcls", C, B)[:, None] * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, x)

    # 2. the state each chunk leaves behind when it starts from zero (decays to the chunk's last step, each summed
    #    from its own terms, so a document start's huge log-decay cannot cancel out of a difference)
    decay_to_end = decay[..., -1, :]  # (b, h, c, s)
    chunk_states = torch.einsum("bhcl,bclhp,bcln->bchpn", decay_to_end, x, B)

    # 3. across chunks: the state entering each chunk, from the initial state and every earlier chunk
    if initial_state is None:
        initial_state = u.new_zeros(batch, num_heads, head_dim, B.shape[-1], dtype=torch.float32)
    states = torch.cat([initial_state.float()[:, None], chunk_states], dim=1)  # (b, c + 1, h, p, n)
    chunk_decay = torch.exp(segment_sum(F.pad(cumulative[..., -1], (1, 0))))  # (b, h, c + 1, c + 1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    entering_states, final_state = states[:, :-1], states[:, -1]

    # 4. what the entering state contributes to each step: exp(log-decay start -> l) S_in C_l
    y = y + torch.einsum("bcln,bchpn,bhcl->bclhp", C, entering_states, torch.exp(cumulative))

    y = y.reshape(batch, -1, num_heads, head_dim)[:, :seq_len] + D[:, None] * u.float()
    return y.to(u.dtype), final_state


def i3_scan_kernel(kernel, u, dt, log_a, B, C, D, *, initial_state=None):
    """`i3_scan_chunked` by flash-linear-attention's `chunk_simple_gla`, which computes, per head,
    S_t = exp(g_t) S_{t-1} + k_t (outer) v_t and o_t = scale * q_t S_t with S: (n, p), the transpose of i3's state:
    so q = C, k = B (shared by the heads), v = dt u, g = log_a, scale 1, and y = o + D u."""
    batch, seq_len, num_heads, _ = u.shape
    heads = (batch, seq_len, num_heads, B.shape[-1])
    y, final_state = kernel(
        q=C.float()[:, :, None].expand(heads), k=B.float()[:, :, None].expand(heads), v=(u * dt[..., None]).float(),
        g=log_a.float(), scale=1.0, output_final_state=True,
        initial_state=None if initial_state is None else initial_state.float().transpose(-1, -2).contiguous(),
    )
    return (y + D[:, None] * u.float()).to(u.dtype), final_state.transpose(-1, -2)


def i3_scan_step(u, dt, log_a, B, C, D, *, initial_state=None):
    """Single-step evaluation of the i3 SSM (decoding): the same as `i3_scan_chunked` with t = 1."""
    y, state = i3_ssm_update(*(v[:, 0].float() for v in (u, dt, log_a, B, C)), D, initial_state)
    return y[:, None].to(u.dtype), state


def i3_ssm_update(u, dt, log_a, B, C, D, state):
    """The recurrence for one token, in float32: u (b, h, p); dt, log_a (b, h); B, C (b, n); state (b, h, p, n) or
    None (empty). Returns y (b, h, p) and the new state."""
    new_state = (dt[..., None] * u)[..., None] * B[:, None, None]
    if state is not None:
        new_state = torch.addcmul(new_state, torch.exp(log_a)[..., None, None], state)
    y = torch.addcmul((new_state * C[:, None, None]).sum(-1), D[:, None], u)
    return y, new_state


class I3RecurrentMixer(nn.Module):
    """The `i3` mixer (docs/design.md#the-i3-mixer): token shift, in-projection, causal conv, selective SSM, gated norm.

    Input-dependent: dt, B, C (from the conv output) and the gate z; learned constants: mu, A_log, dt_bias, D.
    Cached states: "shift" the last token (b, d, 1), "conv" the last conv_kernel - 1 inner inputs (b, inner, K - 1),
    "ssm" the state S (b, h, p, n) in float32.
    """

    def __init__(self, config: I3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.inner_size = config.expand * config.hidden_size
        self.num_heads = config.recurrent_num_heads
        self.head_dim = self.inner_size // self.num_heads
        self.state_size = config.state_size
        self.conv_kernel = config.conv_kernel
        self.chunk_size = config.chunk_size

        self.token_shift = nn.Parameter(torch.empty(config.hidden_size))  # mu, the previous token's share
        self.in_proj = make_linear(config, config.hidden_size, 2 * self.inner_size, bias=False)
        self.conv1d = nn.Conv1d(self.inner_size, self.inner_size, config.conv_kernel, groups=self.inner_size)
        self.x_proj = make_linear(config, self.inner_size, self.num_heads + 2 * self.state_size, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = I3GatedRMSNorm(self.inner_size, eps=config.layer_norm_eps)
        self.out_proj = make_linear(config, self.inner_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        states: RecurrentStates | None = None,
        document_starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`document_starts` (b, t), for packed rows: every state starts afresh there (shift, conv and SSM)."""
        batch, seq_len, _ = hidden_states.shape
        continues_alone = states is not None and "ssm" in states.states and not states.recording
        if seq_len == 1 and attention_mask is None and document_starts is None and continues_alone:
            return self.decode_step(hidden_states, states)
        ssm_state = states.get("ssm") if states is not None else None
        hidden_states = zero_padding(hidden_states, attention_mask)

        # 1. token shift: m_t = x_t + mu (x_{t-1} - x_t), with no previous token at a document start
        previous = previous_tokens(hidden_states, attention_mask, states, "shift")
        if document_starts is not None:
            previous = zero_padding(previous, ~document_starts)
        mixed = token_shift(hidden_states, previous, self.token_shift)

        # 2. [u, z] = W_in m
        u, z = self.in_proj(mixed).chunk(2, dim=-1)

        # 3. causal depthwise conv over the real steps, then SiLU; padded positions are zeroed again after the bias
        u, order = with_history(u.transpose(1, 2), self.conv_kernel - 1, attention_mask, states, "conv")
        if document_starts is not None:
            u = conv_within_documents(u, self.conv1d, document_starts)
        else:
            u = restore_order(causal_depthwise_conv(u, self.conv1d), order, self.conv_kernel - 1)
        u = zero_padding(F.silu(u.transpose(1, 2)), attention_mask)

        # 4. selective SSM; a padded step gets dt = 0, so it neither decays nor feeds the state
        dt, B, C = self.x_proj(u).split([self.num_heads, self.state_size, self.state_size], dim=-1)
        dt = zero_padding(F.softplus((dt + self.dt_bias).float()), attention_mask)
        log_a = -torch.exp(self.A_log.float()) * dt
        if document_starts is not None:  # decay 0 at a document start: nothing from the previous one survives
            log_a = log_a.masked_fill(document_starts[..., None], LOG_DECAY_AT_DOCUMENT_START)
        u_heads = u.reshape(batch, seq_len, self.num_heads, self.head_dim)
        per_token = None
        with without_autocast(u):
            kernel = optional_kernel(u, SSM_KERNEL) if document_starts is None else None  # exact sums needed there
            if states is not None and states.recording:
                y, per_token = scan_step_by_step(i3_scan_step, (u_heads, dt, log_a, B, C), (self.D,), ssm_state)
                ssm_state = per_token[-1]
            elif ssm_state is not None and seq_len == 1:
                y, ssm_state = i3_scan_step(u_heads, dt, log_a, B, C, self.D, initial_state=ssm_state)
            elif kernel is not None:
                y, ssm_state = i3_scan_kernel(kernel, u_heads, dt, log_a, B, C, self.D, initial_state=ssm_state)
            else:
                y, ssm_state = i3_scan_chunked(
                    u_heads, dt, log_a, B, C, self.D, chunk_size=self.chunk_size, initial_state=ssm_state
                )
        if states is not None:
            states.update("ssm", ssm_state, per_token)

        # 5. out = W_out(norm(y) * silu(z))
        return self.out_proj(self.norm(y.reshape(batch, seq_len, self.inner_size), z))

    def decode_step(self, hidden_states: torch.Tensor, states: RecurrentStates) -> torch.Tensor:
        """`forward` for one token that continues every cached state, unpadded (the decoding loop): steps 1-5 without
        the windows, sorting and masks a sequence needs, so that a step runs few small ops."""
        x = hidden_states[:, 0]  # (b, d)
        mixed = token_shift(x, states.get("shift")[..., 0].to(x.dtype), self.token_shift)
        u, z = self.in_proj(mixed).chunk(2, dim=-1)  # (b, E) each
        window = torch.cat([states.get("conv").to(u.dtype), u[..., None]], dim=-1)  # (b, E, K): the conv's inputs
        u = F.silu(causal_depthwise_conv(window, self.conv1d)[..., 0])
        dt, B, C = self.x_proj(u).split([self.num_heads, self.state_size, self.state_size], dim=-1)
        dt = F.softplus((dt + self.dt_bias).float())
        with without_autocast(u):
            y, ssm_state = i3_ssm_update(u.view(-1, self.num_heads, self.head_dim).float(), dt,
                                         -torch.exp(self.A_log.float()) * dt, B.float(), C.float(), self.D,
                                         states.get("ssm"))
        states.update("shift", x[..., None])
        states.update("conv", window[..., 1:])
        states.update("ssm", ssm_state)
        return self.out_proj(self.norm(y.reshape(x.shape[0], 1, self.inner_size).to(z.dtype), z[:, None]))


# --- published-checkpoint mixers, exact (docs/design.md#the-open-i3-mixer, #the-rwkv4-mixer) ---
#
# open-i3, per channel or state entry (w_mix, A, B, C, D are constants):
#   h_t = w_mix * h_{t-1} + (1 - w_mix) * x_t          an exponential moving average of the input, (d)
#   s_t = A s_{t-1} + B x_t                            a linear time-invariant state, (n)
#   y_t = C s_t + D * h_t
# Both are s_t = M s_{t-1} + x_t with a constant M (diagonal for h), so one chunked scan serves both: inside a
# chunk, s_l = sum_{s <= l} M^(l-s) x_s + M^(l+1) s_in; across chunks, s_in is carried by a short loop. Nothing
# constrains w_mix to (0, 1) or A to be stable, so powers are taken as they are, not through logarithms.


def lti_powers(transition: torch.Tensor, count: int) -> torch.Tensor:
    """M^0 .. M^(count-1), stacked: (count, k) for a diagonal M given as (k), (count, k, k) for a matrix."""
    if transition.dim() == 1:
        return transition[None] ** torch.arange(count, device=transition.device, dtype=transition.dtype)[:, None]
    powers = [torch.eye(transition.shape[0], device=transition.device, dtype=transition.dtype)]
    for _ in range(count - 1):
        powers.append(transition @ powers[-1])
    return torch.stack(powers)


def lti_scan_chunked(x, transition, *, chunk_size, initial_state=None):
    """Chunked evaluation of s_t = M s_{t-1} + x_t with a constant M, diagonal (k) or full (k, k).

    x: (b, t, k); initial_state: (b, k) or None. Returns every state (b, t, k) and the last one, in float32.
    """
    batch, seq_len, size = x.shape
    transition = transition.float()
    diagonal = transition.dim() == 1
    x = split_chunks(x.float(), chunk_size)  # (b, c, l, k); padded steps come after the last real one
    powers = lti_powers(transition, chunk_size + 1)  # M^0 .. M^l
    lag = torch.arange(chunk_size, device=x.device)
    lag = lag[:, None] - lag[None, :]  # (l, s): l - s
    causal = (lag >= 0).view(chunk_size, chunk_size, *([1] * (powers.dim() - 1)))
    toeplitz = powers[lag.clamp(min=0)] * causal  # (l, s, k) or (l, s, k, k): M^(l-s), zero above the diagonal

    # 1. inside chunks, starting from zero
    if diagonal:
        states = torch.einsum("lsk,bcsk->bclk", toeplitz, x)
    else:
        states = torch.einsum("lsij,bcsj->bcli", toeplitz, x)

    # 2. across chunks: carry the state entering each chunk, and add M^(l+1) s_in to every step
    state = x.new_zeros(batch, size) if initial_state is None else initial_state.float()
    entering = []
    for chunk_end in states[:, :, -1].unbind(1):
        entering.append(state)
        state = chunk_end + (powers[-1] * state if diagonal else state @ powers[-1].T)
    entering = torch.stack(entering, dim=1)  # (b, c, k)
    if diagonal:
        states = states + powers[1:] * entering[:, :, None]
    else:
        states = states + torch.einsum("lij,bcj->bcli", powers[1:], entering)
    states = states.reshape(batch, -1, size)[:, :seq_len]
    return states, states[:, -1]


def lti_scan_step(x, transition, *, initial_state=None):
    """Single-step evaluation of `lti_scan_chunked` (t = 1): s = M s + x."""
    state = x[:, 0].float()
    if initial_state is not None:
        transition = transition.float()
        state = state + (transition * initial_state if transition.dim() == 1 else initial_state @ transition.T)
    return state[:, None], state


class I3LtiMixer(nn.Module):
    """The `open-i3` mixer of the published i3-80M code (docs/design.md#the-open-i3-mixer): an EMA h and a linear
    state s, no gate.

    Nothing depends on the input except the input itself: w_mix, A, B, C, D are learned constants.
    Cached states, in float32: "average" the moving average h (b, d), "lti" the linear state s (b, n).
    """

    def __init__(self, config: I3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.chunk_size = config.chunk_size
        self.w_mix = nn.Parameter(torch.empty(config.hidden_size))
        self.A = nn.Parameter(torch.empty(config.state_size, config.state_size))
        self.B = nn.Parameter(torch.empty(config.state_size, config.hidden_size))
        self.C = nn.Parameter(torch.empty(config.hidden_size, config.state_size))
        self.D = nn.Parameter(torch.empty(config.hidden_size))

    def forward(self, hidden_states, attention_mask=None, states=None, document_starts=None):
        average = states.get("average") if states is not None else None
        state = states.get("lti") if states is not None else None
        check_padding_keeps_state(attention_mask, state is not None, states is not None, "open-i3")
        x = zero_padding(hidden_states, attention_mask).float()

        per_token_averages = per_token_states = None
        with without_autocast(x):
            ema_input, state_input = (1 - self.w_mix.float()) * x, x @ self.B.float().T
            if states is not None and states.recording:
                averages, per_token_averages = scan_step_by_step(lti_scan_step, (ema_input,), (self.w_mix,), average)
                lti_states, per_token_states = scan_step_by_step(lti_scan_step, (state_input,), (self.A,), state)
                average, state = per_token_averages[-1], per_token_states[-1]
            elif state is not None and x.shape[1] == 1:
                averages, average = lti_scan_step(ema_input, self.w_mix, initial_state=average)
                lti_states, state = lti_scan_step(state_input, self.A, initial_state=state)
            else:
                averages, average = lti_scan_chunked(ema_input, self.w_mix, chunk_size=self.chunk_size,
                                                     initial_state=average)
                lti_states, state = lti_scan_chunked(state_input, self.A, chunk_size=self.chunk_size,
                                                 initial_state=state)
            y = lti_states @ self.C.float().T + self.D.float() * averages
        if states is not None:
            states.update("average", average, per_token_averages)
            states.update("lti", state, per_token_states)
        return y.to(hidden_states.dtype)


# RWKV-v4 WKV as the published i3-200M code computes it, per channel, with w = -exp(time_decay) < 0, u = time_first:
#   wkv_t = (e^u sum_{s<t} e^{(t-1-s) w + k_s} v_s + e^{k_t} v_t) / (e^u sum_{s<t} e^{(t-1-s) w + k_s} + e^{k_t})
# (the bonus u multiplies the past here, where the RWKV-v4 paper gives it to the current token; i3 keeps the
# published arithmetic so that its checkpoints run unchanged).
# The state after step t is (aa, bb, pp) with aa e^pp = sum_{s<=t} e^{(t-s) w + k_s} v_s and bb e^pp the same
# without v: every exponent is taken relative to the running maximum pp, so nothing overflows
# (docs/design.md#the-rwkv4-mixer).

WKV_EMPTY_LOG = -1e30  # pp of the empty state, and the key of a padded step: e^(that) is exactly 0


def wkv_empty_state(like: torch.Tensor) -> torch.Tensor:
    """The state before the first token, (b, 3, d) for keys `like` (b, d): no sums, and pp at the empty exponent."""
    return torch.stack([torch.zeros_like(like), torch.zeros_like(like), torch.full_like(like, WKV_EMPTY_LOG)], dim=1)


def wkv_merge(first, second):
    """Sum two (aa, bb, pp) log-scaled sums, each (..., d), rescaled to the larger exponent."""
    aa1, bb1, pp1 = first
    aa2, bb2, pp2 = second
    pp = torch.maximum(pp1, pp2)
    scale1, scale2 = torch.exp(pp1 - pp), torch.exp(pp2 - pp)
    return aa1 * scale1 + aa2 * scale2, bb1 * scale1 + bb2 * scale2, pp


def wkv4_scan_chunked(k, v, time_decay, time_first, *, chunk_size, initial_state=None):
    """Chunked evaluation of the RWKV-v4 WKV (training and prefill).

    k, v: (b, t, d); time_decay, time_first: (d); initial_state: (b, 3, d) = (aa, bb, pp) or None.
    Returns wkv (b, t, d) in float32 and the final state (b, 3, d).
    """
    batch, seq_len, width = k.shape
    w, u = -torch.exp(time_decay.float()), time_first.float()
    # padded steps get an empty key so they add nothing; the ragged last chunk is measured by its real length
    k = split_chunks(F.pad(k.float(), (0, 0, 0, -seq_len % chunk_size), value=WKV_EMPTY_LOG), chunk_size)
    v = split_chunks(v.float(), chunk_size)  # (b, c, l, d)
    num_chunks = k.shape[1]
    position = torch.arange(chunk_size, device=k.device, dtype=torch.float32)

    # 1. each chunk's own sums at its last real step: exponents k_s + (length - 1 - s) w
    lengths = torch.full((num_chunks,), chunk_size, device=k.device, dtype=torch.float32)
    lengths[-1] = seq_len - (num_chunks - 1) * chunk_size
    exponents = k + (lengths[:, None] - 1 - position)[None, :, :, None] * w  # (b, c, l, d)
    pp_local = exponents.amax(dim=2)
    weights = torch.exp(exponents - pp_local[:, :, None])
    local = ((weights * v).sum(2), weights.sum(2), pp_local)  # each (b, c, d)

    # 2. across chunks: the state entering each chunk, decayed by the chunk's length, merged with its own sums
    if initial_state is None:
        initial_state = wkv_empty_state(k[:, 0, 0])
    state = tuple(initial_state.float().unbind(1))
    entering = []
    for chunk in range(num_chunks):
        entering.append(torch.stack(state, dim=1))
        aa, bb, pp = state
        state = wkv_merge((aa, bb, pp + lengths[chunk] * w), tuple(part[:, chunk] for part in local))
    aa_in, bb_in, pp_in = torch.stack(entering, dim=1).unbind(2)  # each (b, c, d)

    # 3. outputs inside chunks: earlier steps with decay (l - 1 - s) w and the bonus u, the current step as it is,
    #    and the entering state decayed by l w, with the bonus u
    lag = position[:, None] - 1 - position[None, :]  # (l, s)
    exponents = u + k[:, :, None] + lag[..., None] * w  # (b, c, l, s, d)
    is_current = torch.eye(chunk_size, dtype=torch.bool, device=k.device)[..., None]  # (l, s, 1)
    is_later = torch.ones_like(is_current).squeeze(-1).triu(1)[..., None]
    exponents = torch.where(is_current, k[:, :, :, None], exponents).masked_fill(is_later, -torch.inf)
    state_exponent = u + pp_in[:, :, None] + position[:, None] * w  # (b, c, l, d)
    q = torch.maximum(exponents.amax(dim=3), state_exponent)
    weights = torch.exp(exponents - q[:, :, :, None])
    state_weight = torch.exp(state_exponent - q)
    numerator = torch.einsum("bclsd,bcsd->bcld", weights, v) + aa_in[:, :, None] * state_weight
    denominator = weights.sum(3) + bb_in[:, :, None] * state_weight + 1e-8
    wkv = (numerator / denominator).reshape(batch, -1, width)[:, :seq_len]
    return wkv, torch.stack(state, dim=1)


def wkv4_scan_step(k, v, time_decay, time_first, *, initial_state=None):
    """Single-step evaluation of the WKV (decoding): the stable recurrence for one token, = chunked at t = 1."""
    w, u = -torch.exp(time_decay.float()), time_first.float()
    k, v = k[:, 0].float(), v[:, 0].float()
    if initial_state is None:
        initial_state = wkv_empty_state(k)
    aa, bb, pp = initial_state.float().unbind(1)
    q = torch.maximum(u + pp, k)
    e1, e2 = torch.exp(u + pp - q), torch.exp(k - q)
    wkv = (aa * e1 + v * e2) / (bb * e1 + e2 + 1e-8)
    aa, bb, pp = wkv_merge((aa, bb, pp + w), (v, torch.ones_like(v), k))
    return wkv[:, None], torch.stack([aa, bb, pp], dim=1)


class I3WkvTimeMix(nn.Module):
    """The `rwkv4` mixer of the published i3-200M code (docs/design.md#the-rwkv4-mixer): token shift, WKV attention,
    receptance gate.

    k, v and r depend on the input; the decay, the bonus of the current token and the shift mixes are constants.
    Cached states: "shift" the last token (b, d, 1), "wkv" the sums (aa, bb, pp) (b, 3, d) in float32.
    """

    def __init__(self, config: I3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.chunk_size = config.chunk_size
        size = config.hidden_size
        self.time_decay = nn.Parameter(torch.empty(size))
        self.time_first = nn.Parameter(torch.empty(size))
        # the previous token's share in the shifted input of k, v and r (RWKV's time_mix_* are 1 minus these)
        self.token_shift_k = nn.Parameter(torch.empty(size))
        self.token_shift_v = nn.Parameter(torch.empty(size))
        self.token_shift_r = nn.Parameter(torch.empty(size))
        self.key = make_linear(config, size, size, bias=False)
        self.value = make_linear(config, size, size, bias=False)
        self.receptance = make_linear(config, size, size, bias=False)
        self.output = make_linear(config, size, size, bias=False)

    def forward(self, hidden_states, attention_mask=None, states=None, document_starts=None):
        state = states.get("wkv") if states is not None else None
        check_padding_keeps_state(attention_mask, state is not None, states is not None, "rwkv4")
        x = zero_padding(hidden_states, attention_mask)
        previous = previous_tokens(x, attention_mask, states, "shift")
        k = self.key(token_shift(x, previous, self.token_shift_k))
        v = self.value(token_shift(x, previous, self.token_shift_v))
        r = torch.sigmoid(self.receptance(token_shift(x, previous, self.token_shift_r)))
        if attention_mask is not None:  # a padded step must carry no weight in the WKV sums
            k = k.float().masked_fill(~attention_mask.bool()[..., None], WKV_EMPTY_LOG)
        per_token = None
        with without_autocast(x):
            if states is not None and states.recording:
                wkv, per_token = scan_step_by_step(wkv4_scan_step, (k, v), (self.time_decay, self.time_first), state)
                state = per_token[-1]
            elif state is not None and x.shape[1] == 1:
                wkv, state = wkv4_scan_step(k, v, self.time_decay, self.time_first, initial_state=state)
            else:
                wkv, state = wkv4_scan_chunked(k, v, self.time_decay, self.time_first, chunk_size=self.chunk_size,
                                               initial_state=state)
        if states is not None:
            states.update("wkv", state, per_token)
        return self.output(r * wkv.to(r.dtype))


class I3WkvChannelMix(nn.Module):
    """RWKV-v4 channel-mix, the feed-forward of `rwkv4` layers: `sigmoid(r) * W_v relu(k)^2`, with token shift.
    Cached state (in its layer's `RecurrentStates`): "channel_shift" the last token (b, d, 1)."""

    def __init__(self, config: I3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        size = config.hidden_size
        self.token_shift_k = nn.Parameter(torch.empty(size))  # the previous token's share, as in the time-mix
        self.token_shift_r = nn.Parameter(torch.empty(size))
        self.key = make_linear(config, size, config.intermediate_size, bias=False)
        self.receptance = make_linear(config, size, size, bias=False)
        self.value = make_linear(config, config.intermediate_size, size, bias=False)

    def forward(self, hidden_states, attention_mask=None, states=None):
        x = zero_padding(hidden_states, attention_mask)
        previous = previous_tokens(x, attention_mask, states, "channel_shift")
        k = torch.square(torch.relu(self.key(token_shift(x, previous, self.token_shift_k))))
        r = torch.sigmoid(self.receptance(token_shift(x, previous, self.token_shift_r)))
        return r * self.value(k)


RECURRENT_MIXERS = {"i3": I3RecurrentMixer, "open-i3": I3LtiMixer, "rwkv4": I3WkvTimeMix}


# --- attention (docs/design.md#attention-positions-head) ---


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention over (b, h, t, p) tensors; `attention_mask` is additive (b, 1, t, t_kv)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class I3Attention(nn.Module):
    """Causal multi-head attention with a fused `qkv_proj` (as the published checkpoints have) and a KV cache."""

    def __init__(self, config: I3Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.use_rope = config.position_embedding_type == "rope"
        self.qkv_proj = make_linear(config, config.hidden_size, 3 * config.hidden_size, config.attention_bias)
        self.o_proj = make_linear(config, config.hidden_size, config.hidden_size, config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = (
            part.view(hidden_shape).transpose(1, 2) for part in self.qkv_proj(hidden_states).chunk(3, dim=-1)
        )
        if self.use_rope:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class I3DecoderLayer(GradientCheckpointingLayer):
    """One pre-norm residual block: a recurrent mixer or attention, then the feed-forward."""

    def __init__(self, config: I3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if self.layer_type == "full_attention":
            self.self_attn = I3Attention(config, layer_idx)
        else:
            self.linear_attn = RECURRENT_MIXERS[config.recurrent_mixer](config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if self.layer_type == "linear_attention" and config.recurrent_mixer == "rwkv4":
            self.mlp = I3WkvChannelMix(config, layer_idx)
        else:
            self.mlp = I3MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        document_starts: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """`document_starts` (b, t) marks packed documents for the recurrent mixer (attention has them in its mask)."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        states = None
        if self.layer_type == "full_attention":
            hidden_states, _ = self.self_attn(
                hidden_states, position_embeddings, attention_mask, cache, **kwargs
            )
        else:
            states = cache.recurrent_states(self.layer_idx) if cache is not None else None
            hidden_states = self.linear_attn(hidden_states, attention_mask, states, document_starts)
        hidden_states = residual + hidden_states
        feed_forward_input = self.post_attention_layernorm(hidden_states)
        return hidden_states + self.mlp(feed_forward_input, attention_mask=attention_mask, states=states)


class I3PreTrainedModel(PreTrainedModel):
    config: I3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["I3DecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": I3DecoderLayer, "attentions": I3Attention}

    def _init_weights(self, module: nn.Module):
        """Linear and embedding weights N(0, initializer_range); the custom tensors below are (re)built here because
        weights are first created on the meta device."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, I3LowRankLinear):
            init.normal_(module.A, mean=0.0, std=std)
            init.normal_(module.B, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, I3RecurrentMixer):
            # Mamba-2: A = -U(1, 16), dt log-uniform in [time_step_min, time_step_max] through softplus^-1, D = 1
            init.constant_(module.token_shift, 0.5)
            init.copy_(module.A_log, torch.empty_like(module.A_log).uniform_(1, 16).log())
            low, high = math.log(self.config.time_step_min), math.log(self.config.time_step_max)
            dt = torch.exp(torch.empty_like(module.dt_bias).uniform_(low, high))
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
            init.ones_(module.D)
        elif isinstance(module, I3GatedRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, I3LtiMixer):  # the published init
            init.constant_(module.w_mix, 0.5)
            for matrix in (module.A, module.B, module.C):
                init.normal_(matrix, mean=0.0, std=0.01)
            init.constant_(module.D, 0.1)
        elif isinstance(module, I3WkvTimeMix):  # the published init
            init.uniform_(module.time_decay, -6.0, -3.0)
            init.ones_(module.time_first)
            for share in (module.token_shift_k, module.token_shift_v, module.token_shift_r):
                init.zeros_(share)  # the published init: RWKV's time_mix_* = 1, all of the current token
        elif isinstance(module, I3WkvChannelMix):
            init.zeros_(module.token_shift_k)
            init.zeros_(module.token_shift_r)


class I3Model(I3PreTrainedModel):
    """The i3 backbone: embeddings (+ learned positions), the layer stack, the final norm."""

    def __init__(self, config: I3Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.rotary_emb = I3RotaryEmbedding(config)
        self.layers = nn.ModuleList(I3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        """`cache` (an `I3Cache`) continues from earlier tokens; with `use_cache=True` and none given, one is made."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        check_cache(cache)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq_len = inputs_embeds.shape[:2]
        # packed documents (position ids restarting inside a row, as padding-free collators make them) stay apart:
        # attention through transformers' mask, the recurrent layers by starting their states afresh; no cache then
        starts = None
        if position_ids is not None:
            starts = find_document_starts(position_ids.expand(batch, -1), attention_mask, cache)
        if starts is not None and not self.config.separates_packed_documents:
            raise ValueError(
                f"Packed documents (position_ids that restart inside a row) need the `i3` recurrent mixer; the "
                f"`{self.config.recurrent_mixer}` mixer of the published checkpoints would carry one document's state "
                "into the next. Pass one document per row (with padding) instead."
            )
        if use_cache and cache is None and starts is None:
            cache = I3Cache(self.config)
        if position_ids is None:
            cached = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + cached).unsqueeze(0)

        # one mask per layer type present, unless `generate` already prepared them (it does for static caches)
        if not isinstance(masks := attention_mask, dict):
            masks = {"linear_attention": padding_mask(attention_mask, seq_len)}
            if self.config.has_attention:
                masks["full_attention"] = create_causal_mask(
                    self.config, inputs_embeds, attention_mask, cache, position_ids
                )
        if cache is not None and cache.recording and masks["linear_attention"] is not None:
            raise ValueError("Rolling back recurrent states (assisted generation, prompt lookup) needs unpadded rows: "
                             "pass one sequence without padding.")

        hidden_states = inputs_embeds
        position_embeddings = None
        if self.config.position_embedding_type == "learned":
            hidden_states = hidden_states + self.embed_positions(self.check_learned_positions(position_ids))
        else:
            position_embeddings = self.rotary_emb(hidden_states, position_ids)

        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=masks[decoder_layer.layer_type],
                position_embeddings=position_embeddings,
                cache=cache,
                document_starts=starts,
                **kwargs,
            )
        if cache is not None:
            cache.count(seq_len)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)

    def check_learned_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Learned positions end at `max_position_embeddings`: past it there is no embedding, so refuse clearly (in
        eager mode: a compiled graph keeps no data-dependent branch, and the embedding lookup fails there)."""
        if torch.compiler.is_compiling():
            return position_ids
        last_position = int(position_ids.max())
        if last_position >= self.config.max_position_embeddings:
            raise ValueError(
                f"Position {last_position} is past this model's learned positions (max_position_embeddings="
                f"{self.config.max_position_embeddings}); shorten the input to at most "
                f"{self.config.max_position_embeddings} tokens including the cache."
            )
        return position_ids


class I3ForCausalLM(I3PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: I3Config):
        super().__init__(config)
        self.model = I3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """`labels` are the input ids (shifted inside; -100 is ignored). Returns logits (b, t, vocab) and the cache."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ):
        """`generate` starts from an `I3Cache` (static attention layers for `cache_implementation="static"`); a cache
        the user passes, or none at all, is left to transformers' checks."""
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(f"i3 generates with its own cache: `cache_implementation` may be 'dynamic' or 'static', "
                             f"not {implementation!r}.")
        if implementation == "static":
            max_cache_length = max(max_cache_length, generation_config.max_cache_len or 0)
        model_kwargs["cache"] = I3Cache(self.config, max_cache_length if implementation == "static" else None)
        if generation_config.is_assistant:  # a draft model's tokens are rolled back when the main model rejects them
            model_kwargs["cache"].activate_past_recording(
                recurrent_states_to_keep=generation_config.num_assistant_tokens
            )

    def save_pretrained(self, *args, **kwargs):
        """Saved folders also load as the bare backbone (`AutoModel`: hidden states, embeddings)."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": "modeling_i3.I3Model"}
        return super().save_pretrained(*args, **kwargs)


# so that `save_pretrained` writes `auto_map` and copies the code files next to the weights
I3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["I3Cache", "I3ForCausalLM", "I3Model", "I3PreTrainedModel"]
