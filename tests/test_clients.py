"""Real clients of a causal LM: PEFT adapters and transformers' Trainer drive i3 like any other model."""

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from conftest import tiny_model

peft = pytest.importorskip("peft", reason="PEFT is a development dependency (requirements-dev.txt)")


def test_lora_adapter_trains_and_merges_exactly():
    """A LoRA adapter on the recurrent and attention projections trains, and merging it keeps the logits."""
    model = tiny_model()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "out_proj", "qkv_proj", "o_proj"])
    adapted = peft.get_peft_model(model, config)
    ids = torch.randint(4, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = adapted(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    adapted.eval()
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        merged = adapted.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert merged.generate(ids[:, :4], max_new_tokens=6, do_sample=False).shape == (2, 10)


def test_trainer_fits_a_repeated_sequence(tmp_path):
    """transformers' Trainer trains i3 with its own loop: 30 steps on one repeated sequence cut the loss by a third."""
    sequence = list(range(4, 36))
    dataset = Dataset.from_dict({"input_ids": [sequence] * 16, "labels": [sequence] * 16})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=4, learning_rate=3e-3,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0)
    trainer = Trainer(model=tiny_model().train(), args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.7 * losses[0]
