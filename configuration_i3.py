"""Configuration of the i3 hybrid language models: recurrent layers at the bottom, causal attention on top."""

import transformers
from huggingface_hub.dataclasses import strict
from packaging.version import Version
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The transformers releases i3 is tested on (CI runs the oldest and the newest); keep in step with requirements.txt.
TESTED_TRANSFORMERS = ("5.24.0", "5.25")

RECURRENT_MIXERS = ("i3", "open-i3", "rwkv4")
HIDDEN_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "relu", "silu")
LAYER_TYPES = ("linear_attention", "full_attention")
POSITION_EMBEDDING_TYPES = ("rope", "learned")


@strict
class I3Config(PreTrainedConfig):
    r"""
    Configuration of an [`I3ForCausalLM`]. The defaults are the i3-80M layout with the `i3` mixer:
    width 512, 10 recurrent then 6 attention layers, 16 heads, state size 32, vocabulary 35,560.

    Shared:
        vocab_size, hidden_size, intermediate_size (feed-forward width), gated_mlp (a gated feed-forward,
        `down(act(gate(x)) * up(x))`; 2/3 of the plain width gives equal parameters), num_hidden_layers, layer_types
        (one of `"linear_attention"` / `"full_attention"` per layer, bottom to top; derived as 5/8 recurrent then
        attention when omitted), layer_norm_eps, hidden_act, mlp_bias, lm_head_bias, tie_word_embeddings,
        initializer_range, low_rank (rank of factorised linear layers, `None` for ordinary ones;
        docs/design.md#low-rank-linear-layers).
    Positions:
        position_embedding_type (`"rope"` in attention layers, or `"learned"` absolute embeddings added at the input
        as the published checkpoints do), max_position_embeddings (a hard cap only for `"learned"`), rope_parameters.
    Attention:
        num_attention_heads, attention_bias, attention_dropout.
    Recurrent layers:
        recurrent_mixer (`"i3"`: selective SSM; `"open-i3"`: the published i3-80M mixer; `"rwkv4"`: the published
        i3-200M RWKV-v4 time-mix with channel-mix feed-forward; docs/design.md#recurrent-mixers),
        recurrent_num_heads (scalar decays per layer), expand (inner width = expand * hidden_size), state_size,
        conv_kernel, chunk_size (length of the blocks of the chunked scan), time_step_min / time_step_max (range of
        the initial step size dt).
    """

    model_type = "i3"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    # shared
    vocab_size: int = 35560
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int | None = None
    layer_types: list[str] | None = None
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    gated_mlp: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    low_rank: int | None = None
    # positions
    position_embedding_type: str = "rope"
    max_position_embeddings: int = 8192
    rope_parameters: RopeParameters | dict | None = None
    # attention
    num_attention_heads: int = 16
    attention_bias: bool = True
    attention_dropout: float = 0.0
    # recurrent layers
    recurrent_mixer: str = "i3"
    recurrent_num_heads: int = 16
    expand: int = 1
    state_size: int = 32
    conv_kernel: int = 2
    chunk_size: int = 32
    time_step_min: float = 1e-3
    time_step_max: float = 1e-1
    # generation
    use_cache: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 3

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            num_layers = 16 if self.num_hidden_layers is None else self.num_hidden_layers
            num_recurrent = num_layers * 5 // 8
            self.layer_types = ["linear_attention"] * num_recurrent + ["full_attention"] * (num_layers - num_recurrent)
        if self.num_hidden_layers is None:
            self.num_hidden_layers = len(self.layer_types)
        if self.rope_parameters is None and self.position_embedding_type == "rope":
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        self.validate_architecture()  # here too, so a bad value raises a plain `ValueError` from the constructor
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_attention(self) -> bool:
        return "full_attention" in self.layer_types

    @property
    def separates_packed_documents(self) -> bool:
        """Whether documents packed into one row can start afresh (docs/design.md#packed-documents): the `i3` mixer
        drops its states at a document start; the published mixers cannot."""
        return self.recurrent_mixer == "i3"

    def validate_architecture(self):
        """Raise a `ValueError` naming the field for every value the model cannot be built from."""
        if not self.layer_types:
            raise ValueError("`layer_types` must list at least one layer.")
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings",
                    "num_attention_heads", "recurrent_num_heads", "expand", "state_size", "conv_kernel", "chunk_size"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        unknown = sorted({kind for kind in self.layer_types if kind not in LAYER_TYPES})
        if unknown:
            raise ValueError(f"`layer_types` has unknown entries {unknown}; each must be one of {LAYER_TYPES}.")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`num_hidden_layers` ({self.num_hidden_layers}) must equal the length of `layer_types` "
                f"({len(self.layer_types)})."
            )
        if self.recurrent_mixer not in RECURRENT_MIXERS:
            raise ValueError(f"`recurrent_mixer` must be one of {RECURRENT_MIXERS}, got {self.recurrent_mixer!r}.")
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"`hidden_act` must be one of {HIDDEN_ACTIVATIONS}, got {self.hidden_act!r}.")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"`position_embedding_type` must be one of {POSITION_EMBEDDING_TYPES}, "
                f"got {self.position_embedding_type!r}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size; `hidden_size / num_attention_heads` is {self.head_dim}.")
        if (self.expand * self.hidden_size) % self.recurrent_num_heads:
            raise ValueError(
                f"`expand * hidden_size` ({self.expand * self.hidden_size}) must be divisible by "
                f"`recurrent_num_heads` ({self.recurrent_num_heads})."
            )
        if self.conv_kernel < 2:
            raise ValueError(f"`conv_kernel` must be at least 2, got {self.conv_kernel}.")
        if not 0 < self.time_step_min <= self.time_step_max:
            raise ValueError(
                f"`time_step_min` ({self.time_step_min}) and `time_step_max` ({self.time_step_max}) must satisfy "
                "0 < time_step_min <= time_step_max."
            )
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"`attention_dropout` must be in [0, 1), got {self.attention_dropout}.")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"`layer_norm_eps` must be positive, got {self.layer_norm_eps}.")
        if self.low_rank is not None and self.low_rank <= 0:
            raise ValueError(f"`low_rank` must be a positive rank or null, got {self.low_rank}.")


def warn_if_untested_transformers():
    """Remote code runs on whatever transformers is installed, and transformers renames things between releases:
    outside the tested range, say so once rather than let a rename break generation silently."""
    oldest, newest = TESTED_TRANSFORMERS
    installed = Version(transformers.__version__)
    if installed < Version(oldest) or installed.release[:2] > Version(newest).release[:2]:
        logger.warning_once(
            f"i3 is tested with transformers {oldest} to {newest}.x; this is {transformers.__version__}. If loading, "
            f"caching or generation misbehaves, install a tested release: pip install 'transformers>={oldest},<="
            f"{newest}.99'."
        )


warn_if_untested_transformers()

# so that `save_pretrained` writes `auto_map` and copies this file next to the weights
I3Config.register_for_auto_class()

__all__ = ["I3Config"]
