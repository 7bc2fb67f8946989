"""vLLM plugin for i3: registers `I3ForCausalLM` (the `architectures` entry that train.py writes) with vLLM.

vLLM calls `register` in every process it starts (entry point group `vllm.general_plugins`)."""


def register():
    from vllm import ModelRegistry

    if "I3ForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("I3ForCausalLM", "vllm_i3.model:I3ForCausalLM")
