"""The model card (README.md) of every folder i3 writes, trained by train.py or converted by convert_open_i3.py: one
template, filled through huggingface_hub's `ModelCard`, so both kinds of folder read alike on the Hub."""

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

{{ summary }}

## Model details

| | |
|---|---|
{% for field, value in details.items() -%}
| {{ field }} | {{ value }} |
{% endfor %}
## How to use

```python
{% if has_tokenizer -%}
from transformers import pipeline

generator = pipeline("text-generation", model="{{ repo }}", trust_remote_code=True)
print(generator({{ prompt }})[0]["generated_text"])
print(generator([{"role": "user", "content": "Hello!"}])[0]["generated_text"][-1]["content"])
{%- else -%}
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{{ repo }}", trust_remote_code=True)
{%- endif %}
```

The code ships with the weights, so every Auto call needs `trust_remote_code=True`; batches of prompts pad on the
left. {{ usage_note }}
{% for title, body in sections.items() %}
## {{ title }}

{{ body }}
{% endfor %}"""


def model_details(model, tokenizer) -> dict[str, str]:
    """The details table of a model: size, stack, widths, positions, vocabulary and precision."""
    config = model.config
    recurrent = config.layer_types.count("linear_attention")
    details = {
        "Parameters": f"{model.num_parameters():,}",
        "Layers": f"{recurrent} recurrent (`{config.recurrent_mixer}` mixer) + "
                  f"{config.num_hidden_layers - recurrent} attention",
        "Width": f"{config.hidden_size}, feed-forward {config.intermediate_size}",
        "Attention heads": str(config.num_attention_heads),
    }
    if config.recurrent_mixer != "rwkv4":
        details["State size"] = str(config.state_size)
    details["Positions"] = (f"learned, up to {config.max_position_embeddings} tokens"
                            if config.position_embedding_type == "learned" else "RoPE")
    details["Vocabulary"] = f"{config.vocab_size:,}" + (f" ({type(tokenizer).__name__})" if tokenizer else "")
    details["Precision"] = str(model.dtype).removeprefix("torch.")
    return details


def write_model_card(
    path: Path, *, model, tokenizer, name: str, repo: str, summary: str, sections: dict[str, str], tags: list[str],
    usage_note: str = "", prompt: str = "It is a truth universally acknowledged", license: str | None = None,
    datasets: list[str] | None = None,
) -> ModelCard:
    """Fill the template for `model` (and its tokenizer, or None) and save it at `path`."""
    data = ModelCardData(license=license, library_name="transformers", pipeline_tag="text-generation",
                         language=["en"], tags=["i3", "custom_code", *tags], datasets=datasets or None)
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, name=name, repo=repo, summary=summary, details=model_details(model, tokenizer),
        has_tokenizer=tokenizer is not None, prompt=repr(prompt), usage_note=usage_note, sections=sections)
    card.save(path)
    return card
