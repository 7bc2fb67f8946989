"""i3 in vLLM: the hybrid stack of modeling_i3.py written in vLLM's layer vocabulary.

Attention layers are vLLM `Attention` (paged KV cache) with vLLM's RoPE, or learned positions added at the input.
Each recurrent layer is a `MambaBase` whose states live in vLLM's state cache, one slot per running request, so
continuous batching, chunked prefill and prefix caching (align mode) work as for vLLM's own Mamba-2 models:

  - `i3` (SPEC 2.1): the token shift, then vLLM's Mamba-2 ops (causal conv with SiLU, the chunked SSD scan for
    prefills, the selective state update for decodes) with i3's scalar decay per head, one group of B and C, D skip
    and softplus(dt + dt_bias); the gated RMSNorm normalises before the gate (vLLM's Mamba-2 norm gates first), so
    it is written here.
  - `open-i3` (SPEC 2.2) and `rwkv4` (SPEC 2.3): recurrences vLLM has no op for, stepped here in torch over all
    requests of a batch side by side.

Tokens arrive flat, (t, d): decode requests first (one token each), then prefill chunks. Parameter names are those of
modeling_i3.py, so `model.safetensors` from train.py or convert_open_i3.py loads as it is.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CUDAGraphMode, VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import LayerNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from vllm.model_executor.layers.mamba.ops.ssd_combined import mamba_chunk_scan_combined_varlen
from vllm.model_executor.layers.mamba.ops.ssu_dispatch import selective_state_update
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

# --- small pieces ---


class LowRankLinear(nn.Module):
    """`y = x (A B)^T + b` (SPEC 2.6), returning `(y, None)` like vLLM's linear layers."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.A = nn.Parameter(torch.empty(out_features, rank))
        self.B = nn.Parameter(torch.empty(rank, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(F.linear(x, self.B), self.A, self.bias), None


def make_linear(config, in_features: int, out_features: int, bias: bool, prefix: str) -> nn.Module:
    """A vLLM `ReplicatedLinear`, or the low-rank factorisation when `config.low_rank` is set."""
    if config.low_rank is None:
        return ReplicatedLinear(in_features, out_features, bias=bias, prefix=prefix)
    return LowRankLinear(in_features, out_features, config.low_rank, bias)


class I3MLP(nn.Module):
    """`down(act(up(x)))`, or with `gated_mlp` `down(act(gate(x)) * up(x))`."""

    def __init__(self, config, prefix: str):
        super().__init__()
        size, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = make_linear(config, size, inner, bias, f"{prefix}.gate_proj") if config.gated_mlp else None
        self.up_proj = make_linear(config, size, inner, bias, f"{prefix}.up_proj")
        self.down_proj = make_linear(config, inner, size, bias, f"{prefix}.down_proj")
        self.act_fn = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act_fn(self.up_proj(x)[0]) if self.gate_proj is None else (
            self.act_fn(self.gate_proj(x)[0]) * self.up_proj(x)[0])
        return self.down_proj(hidden)[0]


class I3GatedRMSNorm(nn.Module):
    """`weight * rmsnorm(y) * silu(z)`, normalising before the gate as modeling_i3 does (vLLM's Mamba-2 norm,
    `Mixer2RMSNormGated`, gates first: `rmsnorm(y * silu(z))`)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(y.float(), y.shape[-1:], self.weight.float(), self.eps)
        return normed.to(gate.dtype) * F.silu(gate)


# --- the requests of one step, as the recurrent layers see them ---


@dataclass
class RequestBatch:
    """Where each request's tokens sit in the flat (t, d) input and which state slot it owns, decodes first."""

    starts: torch.Tensor  # (r,) index of each request's first token
    lengths: torch.Tensor  # (r,)
    slots: torch.Tensor  # (r,) its slot in every recurrent state cache
    continuing: torch.Tensor  # (r,) True where the slot holds this request's state from earlier tokens
    num_tokens: int
    max_length: int

    @classmethod
    def from_metadata(cls, metadata) -> "RequestBatch":
        """From vLLM's Mamba-2 metadata (speculative decoding, with several tokens per decode, is not supported).
        All recurrent layers of a step share one metadata object, so the batch is built once per step."""
        if getattr(metadata, "i3_requests", None) is None:
            metadata.i3_requests = cls.build(metadata)
        return metadata.i3_requests

    @classmethod
    def build(cls, metadata) -> "RequestBatch":
        num_decodes, device = metadata.num_decodes, metadata.seq_lens.device
        starts, lengths, slots, continuing = [], [], [], []
        if num_decodes:
            starts.append(torch.arange(num_decodes, device=device))
            lengths.append(torch.ones(num_decodes, dtype=torch.long, device=device))
            slots.append(metadata.state_indices_tensor_d[:, 0])
            continuing.append(torch.ones(num_decodes, dtype=torch.bool, device=device))
        if metadata.num_prefills:
            bounds = metadata.query_start_loc_p.long()
            starts.append(bounds[:-1] + metadata.num_decode_tokens)
            lengths.append(bounds.diff())
            slots.append(metadata.state_indices_tensor_p)
            continuing.append(metadata.has_initial_states_p)
        lengths = torch.cat(lengths)
        return cls(torch.cat(starts), lengths, torch.cat(slots).long(), torch.cat(continuing),
                   metadata.num_decode_tokens + metadata.num_prefill_tokens, int(lengths.max()))

    def entering(self, state: torch.Tensor) -> torch.Tensor:
        """The state each request starts this step from: its slot's, or zeros for a new request (`where`, not a
        product: a slot not yet written may hold anything, NaN included)."""
        held = state[self.slots]
        return torch.where(self.continuing.view(-1, *([1] * (held.dim() - 1))), held, torch.zeros_like(held))


def previous_tokens(x: torch.Tensor, shift_state: torch.Tensor, batch: RequestBatch) -> torch.Tensor:
    """(t, d) -> (t, d): x_{t-1} for every token (RWKV token shift); a request's first token gets its slot's last
    token (zeros for a new request). Leaves every request's last token in its slot of `shift_state` (slots, 1, d)."""
    previous = torch.roll(x, 1, dims=0)
    previous[batch.starts] = batch.entering(shift_state)[:, 0].to(x.dtype)
    shift_state[batch.slots, 0] = x[batch.starts + batch.lengths - 1].to(shift_state.dtype)
    return previous


def token_shift(current: torch.Tensor, previous: torch.Tensor, past_weight: torch.Tensor) -> torch.Tensor:
    """`current + past_weight * (previous - current)`: the weight is the previous token's share, as in modeling_i3."""
    return torch.lerp(current, previous, past_weight.to(current.dtype))


def step_requests(step: Callable, inputs: tuple[torch.Tensor, ...], state: tuple[torch.Tensor, ...],
                  batch: RequestBatch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run `step(state, *inputs_t) -> (y_t, state)` through every request's tokens, all requests side by side.

    inputs: each (t, ...) in token order; state: each (r, ...), the requests' entering states.
    Returns y (t, ...) in token order and the requests' final states. A request that has run out of tokens keeps
    its state while the longer ones go on."""
    offsets = torch.arange(batch.max_length, device=batch.starts.device)
    is_real = offsets < batch.lengths[:, None]  # (r, l)
    index = torch.where(is_real, batch.starts[:, None] + offsets, 0)  # (r, l)
    outputs = []
    for position in range(batch.max_length):
        y, stepped = step(state, *(x[index[:, position]] for x in inputs))
        keep = is_real[:, position]
        state = tuple(torch.where(keep.view(-1, *([1] * (new.dim() - 1))), new, old)
                      for new, old in zip(stepped, state))
        outputs.append(y)
    return torch.stack(outputs, dim=1)[is_real], state


# --- recurrent mixers: each names its states, computes from them, and writes them back ---


class I3SelectiveMixer(nn.Module):
    """The `i3` mixer (SPEC 2.1): token shift, in-projection, causal conv + SiLU, selective SSM, gated RMSNorm.

    States: the SSM state S (h, p, n) in float32, the last conv_kernel - 1 conv inputs (K - 1, E), the last token."""

    def __init__(self, config, prefix: str):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.inner_size = config.expand * config.hidden_size
        self.num_heads = config.recurrent_num_heads
        self.head_dim = self.inner_size // self.num_heads
        self.state_size = config.state_size
        self.conv_kernel = config.conv_kernel
        self.token_shift = nn.Parameter(torch.empty(config.hidden_size))
        self.in_proj = make_linear(config, config.hidden_size, 2 * self.inner_size, False, f"{prefix}.in_proj")
        self.conv1d = nn.Conv1d(self.inner_size, self.inner_size, config.conv_kernel, groups=self.inner_size)
        self.x_proj = make_linear(config, self.inner_size, self.num_heads + 2 * self.state_size, False,
                                  f"{prefix}.x_proj")
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = I3GatedRMSNorm(self.inner_size, config.layer_norm_eps)
        self.out_proj = make_linear(config, self.inner_size, config.hidden_size, False, f"{prefix}.out_proj")

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.num_heads, self.head_dim, self.state_size), (self.conv_kernel - 1, self.inner_size), \
            (1, self.hidden_size)

    def state_dtypes(self, model_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        return torch.float32, model_dtype, model_dtype

    def forward(self, x: torch.Tensor, states: tuple[torch.Tensor, ...], batch: RequestBatch, metadata) -> torch.Tensor:
        ssm_state, conv_state, shift_state = states
        conv_state = conv_state.transpose(-1, -2)  # (slots, E, K - 1), as vLLM's conv ops read it
        num_decodes, num_prefill_tokens = metadata.num_decode_tokens, metadata.num_prefill_tokens

        # 1. token shift: m_t = x_t + mu (x_{t-1} - x_t)
        mixed = token_shift(x, previous_tokens(x, shift_state, batch), self.token_shift)
        # 2. [u, z] = W_in m
        u, z = self.in_proj(mixed)[0].chunk(2, dim=-1)
        u_d, u_p = u.split([num_decodes, num_prefill_tokens])
        # 3. causal depthwise conv, then SiLU (vLLM's ops; they read and write conv_state)
        conv_weight = self.conv1d.weight.view(self.inner_size, self.conv_kernel)
        if num_decodes:
            u_d = causal_conv1d_update(u_d, conv_state, conv_weight, self.conv1d.bias, "silu",
                                       conv_state_indices=metadata.state_indices_tensor_d)
        if num_prefill_tokens:
            u_p = causal_conv1d_fn(u_p.transpose(0, 1), conv_weight, self.conv1d.bias, activation="silu",
                                   conv_states=conv_state, has_initial_state=metadata.has_initial_states_p,
                                   cache_indices=metadata.state_indices_tensor_p, metadata=metadata,
                                   query_start_loc=metadata.query_start_loc_p).transpose(0, 1)
        # 4. selective SSM, dt = softplus(W_dt u + b_dt), A = -exp(A_log), one group of B and C
        A = -torch.exp(self.A_log.float())
        outputs = []
        if num_decodes:
            outputs.append(self.ssm_decode(u_d, A, ssm_state, metadata))
        if num_prefill_tokens:
            outputs.append(self.ssm_prefill(u_p, A, ssm_state, metadata))
        y = torch.cat(outputs).view(-1, self.inner_size)
        # 5. out = W_out(weight * rmsnorm(y) * silu(z))
        return self.out_proj(self.norm(y, z))[0]

    def split_projection(self, u: torch.Tensor):
        dt, B, C = self.x_proj(u)[0].split([self.num_heads, self.state_size, self.state_size], dim=-1)
        return dt, B.unsqueeze(1), C.unsqueeze(1)  # B, C: (t, 1 group, n)

    def ssm_decode(self, u, A, ssm_state, metadata) -> torch.Tensor:
        """One step per decode request: vLLM's selective state update (it takes per-(head, p) dt, A, D). On CPU the
        decodes go through the SSD scan instead, as one-token sequences: vLLM's CPU state-update kernel took 93 ms
        per call for 64 requests on 2 threads of a busy machine (0.6 ms on 1 thread), the scan a few ms."""
        if current_platform.is_cpu():
            return self.ssm_scan(u, A, ssm_state, metadata.state_indices_tensor_d[:, 0], True, one_token_chunks(u))
        dt, B, C = self.split_projection(u)
        heads = u.view(-1, self.num_heads, self.head_dim)
        out = torch.empty_like(heads)
        selective_state_update(
            ssm_state, heads, dt[..., None].expand(-1, -1, self.head_dim),
            A[:, None, None].expand(-1, self.head_dim, self.state_size), B, C,
            D=self.D[:, None].expand(-1, self.head_dim), dt_bias=self.dt_bias[:, None].expand(-1, self.head_dim),
            dt_softplus=True, state_batch_indices=metadata.state_indices_tensor_d, out=out,
        )
        return out

    def ssm_prefill(self, u, A, ssm_state, metadata) -> torch.Tensor:
        """The chunked SSD scan over every prefill chunk, from the slot's state where a request continues."""
        chunks = (metadata.chunk_size, metadata.query_start_loc_p, metadata.cu_chunk_seqlen_p,
                  metadata.last_chunk_indices_p, metadata.seq_idx_p)
        continuing = metadata.has_initial_states_p if metadata.prep_initial_states else None
        return self.ssm_scan(u, A, ssm_state, metadata.state_indices_tensor_p, continuing, chunks)

    def ssm_scan(self, u, A, ssm_state, slots, continuing, chunks) -> torch.Tensor:
        """vLLM's varlen SSD scan over requests laid out by `chunks` = (chunk size, cu_seqlens, cu_chunk_seqlens,
        last_chunk_indices, seq_idx), each from its slot's state where `continuing` (r,) says so (all of them when
        it is True, none when None), leaving the final states in the slots."""
        dt, B, C = self.split_projection(u)
        heads = u.view(-1, self.num_heads, self.head_dim)
        initial_states = None
        if continuing is True:
            initial_states = ssm_state[slots]
        elif continuing is not None:
            initial_states = torch.where(continuing[:, None, None, None], ssm_state[slots], 0)
        chunk_size, cu_seqlens, cu_chunk_seqlens, last_chunk_indices, seq_idx = chunks
        out = torch.empty_like(heads)
        final_states = mamba_chunk_scan_combined_varlen(
            heads, dt, A, B, C, chunk_size=chunk_size, cu_seqlens=cu_seqlens, cu_chunk_seqlens=cu_chunk_seqlens,
            last_chunk_indices=last_chunk_indices, seq_idx=seq_idx, out=out, D=self.D, dt_bias=self.dt_bias,
            initial_states=initial_states, dt_softplus=True, state_dtype=ssm_state.dtype,
        )
        ssm_state[slots] = final_states
        return out


def one_token_chunks(u: torch.Tensor) -> tuple:
    """The SSD scan's layout for decodes: every request one token, one chunk of its own."""
    index = torch.arange(u.shape[0] + 1, device=u.device, dtype=torch.int32)
    return 1, index, index, index[:-1], index[:-1]


class I3LtiMixer(nn.Module):
    """The `open-i3` mixer (SPEC 2.2): h_t = w h_{t-1} + (1 - w) x_t, s_t = A s_{t-1} + B x_t, y_t = C s_t + D h_t.

    States (float32): the moving average h (1, d) and the linear state s (1, n)."""

    def __init__(self, config, prefix: str):
        super().__init__()
        self.hidden_size, self.state_size = config.hidden_size, config.state_size
        self.w_mix = nn.Parameter(torch.empty(config.hidden_size))
        self.A = nn.Parameter(torch.empty(config.state_size, config.state_size))
        self.B = nn.Parameter(torch.empty(config.state_size, config.hidden_size))
        self.C = nn.Parameter(torch.empty(config.hidden_size, config.state_size))
        self.D = nn.Parameter(torch.empty(config.hidden_size))

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (1, self.hidden_size), (1, self.state_size)

    def state_dtypes(self, model_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        return torch.float32, torch.float32

    def step(self, state, ema_input, state_input):
        average, linear_state = state
        average = self.w_mix.float() * average + ema_input
        linear_state = linear_state @ self.A.float().T + state_input
        return linear_state @ self.C.float().T + self.D.float() * average, (average, linear_state)

    def forward(self, x: torch.Tensor, states: tuple[torch.Tensor, ...], batch: RequestBatch, metadata) -> torch.Tensor:
        average_state, linear_state = states
        x32 = x.float()
        entering = (batch.entering(average_state)[:, 0], batch.entering(linear_state)[:, 0])
        y, (average, linear) = step_requests(
            self.step, ((1 - self.w_mix.float()) * x32, x32 @ self.B.float().T), entering, batch)
        average_state[batch.slots, 0], linear_state[batch.slots, 0] = average, linear
        return y.to(x.dtype)


WKV_EMPTY_LOG = -1e30  # pp of the empty WKV state: e^(that) is exactly 0


class I3WkvTimeMix(nn.Module):
    """The `rwkv4` time-mix (SPEC 2.3): token shift into k, v, r; the numerically stable WKV; `W_o(sigmoid(r) wkv)`.

    States (float32): the last token (1, d), (aa, bb, pp) (3, d)."""

    def __init__(self, config, prefix: str):
        super().__init__()
        size = config.hidden_size
        self.hidden_size = size
        self.time_decay = nn.Parameter(torch.empty(size))
        self.time_first = nn.Parameter(torch.empty(size))
        self.token_shift_k = nn.Parameter(torch.empty(size))
        self.token_shift_v = nn.Parameter(torch.empty(size))
        self.token_shift_r = nn.Parameter(torch.empty(size))
        self.key = make_linear(config, size, size, False, f"{prefix}.key")
        self.value = make_linear(config, size, size, False, f"{prefix}.value")
        self.receptance = make_linear(config, size, size, False, f"{prefix}.receptance")
        self.output = make_linear(config, size, size, False, f"{prefix}.output")

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (1, self.hidden_size), (3, self.hidden_size)

    def state_dtypes(self, model_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        return torch.float32, torch.float32

    def step(self, state, k, v):
        """SPEC 2.3's recurrence for one token of every request."""
        aa, bb, pp = state
        w, u = -torch.exp(self.time_decay.float()), self.time_first.float()
        q = torch.maximum(u + pp, k)
        e1, e2 = torch.exp(u + pp - q), torch.exp(k - q)
        wkv = (aa * e1 + v * e2) / (bb * e1 + e2 + 1e-8)
        q = torch.maximum(w + pp, k)
        e1, e2 = torch.exp(w + pp - q), torch.exp(k - q)
        return wkv, (aa * e1 + v * e2, bb * e1 + e2, q)

    def forward(self, x: torch.Tensor, states: tuple[torch.Tensor, ...], batch: RequestBatch, metadata) -> torch.Tensor:
        shift_state, wkv_state = states
        previous = previous_tokens(x, shift_state, batch)
        k = self.key(token_shift(x, previous, self.token_shift_k))[0].float()
        v = self.value(token_shift(x, previous, self.token_shift_v))[0].float()
        r = torch.sigmoid(self.receptance(token_shift(x, previous, self.token_shift_r))[0])
        held = wkv_state[batch.slots]
        empty = torch.stack([torch.zeros_like(held[:, 0]), torch.zeros_like(held[:, 0]),
                             torch.full_like(held[:, 0], WKV_EMPTY_LOG)], dim=1)
        entering = torch.where(batch.continuing[:, None, None], held, empty).unbind(1)
        wkv, final = step_requests(self.step, (k, v), entering, batch)
        wkv_state[batch.slots] = torch.stack(final, dim=1)
        return self.output(r * wkv.to(r.dtype))[0]


class I3WkvChannelMix(nn.Module):
    """RWKV-v4 channel-mix, the feed-forward of `rwkv4` layers: `sigmoid(W_r xr) * W_v relu(W_k xk)^2`.

    State: the last token (1, d), for its own token shift."""

    def __init__(self, config, prefix: str):
        super().__init__()
        size = config.hidden_size
        self.token_shift_k = nn.Parameter(torch.empty(size))
        self.token_shift_r = nn.Parameter(torch.empty(size))
        self.key = make_linear(config, size, config.intermediate_size, False, f"{prefix}.key")
        self.receptance = make_linear(config, size, size, False, f"{prefix}.receptance")
        self.value = make_linear(config, config.intermediate_size, size, False, f"{prefix}.value")

    def forward(self, x: torch.Tensor, shift_state: torch.Tensor, batch: RequestBatch) -> torch.Tensor:
        previous = previous_tokens(x, shift_state, batch)
        k = torch.square(torch.relu(self.key(token_shift(x, previous, self.token_shift_k))[0]))
        r = torch.sigmoid(self.receptance(token_shift(x, previous, self.token_shift_r))[0])
        return r * self.value(k)[0]


RECURRENT_MIXERS = {"i3": I3SelectiveMixer, "open-i3": I3LtiMixer, "rwkv4": I3WkvTimeMix}


# --- decoder layers ---


class I3RecurrentDecoderLayer(nn.Module, MambaBase):
    """A pre-norm residual block around a recurrent mixer; its states (the mixer's, and for `rwkv4` the channel-mix
    token shift) are one entry of vLLM's state cache, registered under this layer's name."""

    def __init__(self, config, prefix: str):
        super().__init__()
        vllm_config = get_current_vllm_config()
        self.model_dtype = vllm_config.model_config.dtype
        self.prefix = prefix
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.linear_attn = RECURRENT_MIXERS[config.recurrent_mixer](config, f"{prefix}.linear_attn")
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.recurrent_mixer == "rwkv4":
            self.mlp = I3WkvChannelMix(config, f"{prefix}.mlp")
        else:
            self.mlp = I3MLP(config, f"{prefix}.mlp")
        self.kv_cache = (torch.tensor([]),)
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self

    # MambaBase: what vLLM allocates for every request slot
    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        channel_shift = ((1, self.linear_attn.hidden_size),) if isinstance(self.mlp, I3WkvChannelMix) else ()
        return (*self.linear_attn.state_shapes(), *channel_shift)

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        channel_shift = (torch.float32,) if isinstance(self.mlp, I3WkvChannelMix) else ()
        return (*self.linear_attn.state_dtypes(self.model_dtype), *channel_shift)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.MAMBA2  # its metadata: request bounds, slots, SSD chunks

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if metadata is None:  # the profiling run: no states yet, only the shapes matter
            return hidden_states + self.mlp_without_state(self.post_attention_layernorm(hidden_states))
        batch = RequestBatch.from_metadata(metadata)
        x = hidden_states[: batch.num_tokens]  # vLLM may pad the batch past its real tokens
        num_mixer_states = len(self.linear_attn.state_shapes())
        x = x + self.linear_attn(self.input_layernorm(x), self.kv_cache[:num_mixer_states], batch, metadata)
        normed = self.post_attention_layernorm(x)
        if isinstance(self.mlp, I3WkvChannelMix):
            x = x + self.mlp(normed, self.kv_cache[num_mixer_states], batch)
        else:
            x = x + self.mlp(normed)
        if batch.num_tokens == hidden_states.shape[0]:
            return x
        return torch.cat([x, hidden_states[batch.num_tokens:]])

    def mlp_without_state(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.mlp, I3WkvChannelMix):
            return self.mlp.value(torch.relu(self.mlp.key(x)[0]))[0]
        return self.mlp(x)


class I3Attention(nn.Module):
    """Causal multi-head attention with a fused `qkv_proj` (q, k, v = its output in three), RoPE or none."""

    def __init__(self, config, cache_config, prefix: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.hidden_size = config.hidden_size
        self.qkv_proj = make_linear(config, config.hidden_size, 3 * config.hidden_size, config.attention_bias,
                                    f"{prefix}.qkv_proj")
        self.o_proj = make_linear(config, config.hidden_size, config.hidden_size, config.attention_bias,
                                  f"{prefix}.o_proj")
        self.rotary_emb = None
        if config.position_embedding_type == "rope":
            self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                       is_neox_style=True, rope_parameters=config.rope_parameters)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_heads,
                              cache_config=cache_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states)[0].split(self.hidden_size, dim=-1)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))[0]


class I3AttentionDecoderLayer(nn.Module):
    def __init__(self, config, cache_config, prefix: str):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = I3Attention(config, cache_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = I3MLP(config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(positions, self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# --- the model ---


class I3Model(nn.Module):
    """Embeddings (+ learned positions), the layer stack, the final LayerNorm."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_positions = None
        if config.position_embedding_type == "learned":
            self.embed_positions = VocabParallelEmbedding(config.max_position_embeddings, config.hidden_size)

        def layer(index: int) -> nn.Module:
            name = f"{prefix}.layers.{index}"
            if config.layer_types[index] == "full_attention":
                return I3AttentionDecoderLayer(config, vllm_config.cache_config, name)
            return I3RecurrentDecoderLayer(config, name)

        self.layers = nn.ModuleList(layer(index) for index in range(config.num_hidden_layers))
        self.norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        hidden_states = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(positions)
        for decoder_layer in self.layers:
            if isinstance(decoder_layer, I3AttentionDecoderLayer):
                hidden_states = decoder_layer(positions, hidden_states)
            else:
                hidden_states = decoder_layer(hidden_states)
        return self.norm(hidden_states)


class I3ForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """i3 for vLLM: `I3Model` and the LM head (tied to the embeddings when the config says so)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        refuse_unsupported(vllm_config)
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = I3Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=config.lm_head_bias,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    # IsHybrid: the state of one recurrent layer, from the config alone
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return recurrent_state_layout(vllm_config.model_config.hf_config, vllm_config.model_config.dtype)[0]

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return recurrent_state_layout(vllm_config.model_config.hf_config, vllm_config.model_config.dtype)[1]

    @classmethod
    def get_mamba_state_copy_func(cls):
        """Prefix caching (align mode) copies a request's states block to block: each state is copied whole."""
        return (get_temporal_copy_spec,) * 3

    def get_mamba_state_copy_funcs(self, mamba_types):
        """One copy function per state of this model's mixer (2 or 3 states, by mixer)."""
        count = len(recurrent_state_layout(self.config, torch.float32)[0])
        return {mamba_type: (get_temporal_copy_spec,) * count for mamba_type in mamba_types}

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds=None, **kwargs) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied = ["lm_head.weight"] if self.config.tie_word_embeddings else []  # the embedding is the head
        return AutoWeightsLoader(self, ignore_unexpected_prefixes=tied).load_weights(weights)


def refuse_unsupported(vllm_config: VllmConfig):
    """One line for each engine setting this plugin does not implement, instead of wrong tokens later."""
    if vllm_config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE:
        raise ValueError("i3's recurrent layers have no CUDA-graph path (they read per-request lengths on the host): "
                         "start vLLM with --enforce-eager (LLM(..., enforce_eager=True)).")
    if vllm_config.speculative_config is not None:
        raise ValueError("i3's recurrent layers take one token per decode step: speculative decoding is not supported.")
    if vllm_config.parallel_config.tensor_parallel_size > 1 or vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("i3's vLLM plugin runs on one device: use tensor_parallel_size=1 and pipeline_parallel_size=1 "
                         "(data parallelism, one engine per device, works).")


def recurrent_state_layout(config, model_dtype: torch.dtype):
    """(shapes, dtypes) of one recurrent layer's states, as `I3RecurrentDecoderLayer` declares them."""
    inner = config.expand * config.hidden_size
    if config.recurrent_mixer == "i3":
        shapes = ((config.recurrent_num_heads, inner // config.recurrent_num_heads, config.state_size),
                  (config.conv_kernel - 1, inner), (1, config.hidden_size))
        return shapes, (torch.float32, model_dtype, model_dtype)
    if config.recurrent_mixer == "open-i3":
        return ((1, config.hidden_size), (1, config.state_size)), (torch.float32,) * 2
    return ((1, config.hidden_size), (3, config.hidden_size), (1, config.hidden_size)), (torch.float32,) * 3
