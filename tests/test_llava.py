"""A tiny LLaVA built from a config: only the language model is adapted (issue #2, behaviour 7)."""

import torch
from peft import get_peft_model

import cmlora
from cmlora import MixLoraConfig

from .conftest import IMAGE_TOKEN, IMAGE_TOKENS_PER_IMAGE, random_tokens, tiny_llava


def llava_batch(lengths, seed=0):
    """Right-padded rows of [image tokens] + text, with pixel values and labels on the last 2 text tokens."""
    rows = [torch.cat([torch.full((IMAGE_TOKENS_PER_IMAGE,), IMAGE_TOKEN), random_tokens(1, n, seed=seed + n)[0]])
            for n in lengths]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        labels[i, len(row) - 2: len(row)] = row[-2:]
    torch.manual_seed(seed)
    pixels = torch.randn(len(rows), 3, 32, 32)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels)


def adapted_llava():
    config = MixLoraConfig(num_factors=8, r=2, modules_to_save=["multi_modal_projector"], init_weights=False)
    return get_peft_model(tiny_llava(), config)


def test_default_targets_are_the_language_model_projections_only():
    model = adapted_llava()
    adapted = [n for n, m in model.named_modules() if isinstance(m, cmlora.MixLoraLayer)]
    assert len(adapted) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert all("language_model" in n for n in adapted)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("vision_tower" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)


def test_training_step_updates_projector_and_factors_but_not_the_vision_tower():
    model = adapted_llava()
    model.train()
    loss = model(**llava_batch([5, 3])).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None for n in grads if "vision_tower" in n)
    projector = [g for n, g in grads.items() if "multi_modal_projector" in n and "modules_to_save" in n]
    assert projector and all(g is not None and g.abs().sum() > 0 for g in projector)
    factors_b = [g for n, g in grads.items() if "mixlora_factors_b" in n]
    assert factors_b and all(g is not None and g.abs().sum() > 0 for g in factors_b)


def test_llava_logits_do_not_depend_on_batch_mates():
    model = adapted_llava().eval()
    together = llava_batch([5, 9])
    alone = {k: v[:1] for k, v in together.items()}
    alone["input_ids"] = alone["input_ids"][:, : 4 + 5]
    alone["attention_mask"] = alone["attention_mask"][:, : 4 + 5]
    alone["labels"] = alone["labels"][:, : 4 + 5]
    with torch.no_grad():
        first = model(**together).logits[0, : 4 + 5]
        single = model(**alone).logits[0]
    assert (first - single).abs().max().item() <= 1e-5


def test_llava_generates_with_images():
    model = adapted_llava().eval()
    batch = llava_batch([5, 5])
    with cmlora.trace_routing(model) as trace:
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    assert all(len(records) == 1 for records in trace.records.values())
