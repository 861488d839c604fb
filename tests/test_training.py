"""Router gradients, load balancing, task routing, gradient checkpointing (issue #2, behaviour 5)."""

import pytest
import torch
from peft import get_peft_model

import cmlora
from cmlora import MixLoraConfig

from .conftest import random_tokens, tiny_llama


def batch(seed=0):
    ids = random_tokens(4, 8, seed=seed)
    labels = ids.clone()
    labels[:, :5] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def build(**kwargs):
    config = dict(num_factors=8, r=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    config.update(kwargs)
    return get_peft_model(tiny_llama(), MixLoraConfig(**config))


def router_tensors(model):
    return {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if "mixlora_router" in n}


@pytest.mark.parametrize("mode", ["scores", "straight_through"])
def test_learning_routers_get_gradients(mode):
    model = build(router_grad=mode)
    model.train()
    model(**batch()).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "mixlora_router" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert any(n.endswith("weight_cfs") for n in grads)


def test_straight_through_forward_equals_unscaled_forward():
    inputs = batch()
    losses = []
    for mode in ("none", "straight_through"):
        model = build(router_grad=mode).eval()
        with torch.no_grad():
            losses.append(model(**inputs).loss)
    torch.testing.assert_close(losses[0], losses[1])


def test_straight_through_trains_the_routers_alone():
    # Its forward does not use the pair coefficients, so their gradient is a surrogate: pushed back through the
    # pooled input and the A factors CFS reads, it would move the layers below and the factors by a gradient of
    # nothing the loss computes (on the suite that diverged). Every other parameter gets "none"'s gradient.
    inputs = batch()
    grads = {}
    for mode in ("none", "straight_through"):
        torch.manual_seed(0)
        model = build(router_grad=mode, target_modules=["q_proj", "v_proj", "down_proj"]).train()
        model(**inputs).loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    routers = [n for n in grads["straight_through"] if "mixlora_router" in n]
    assert routers and all(grads["straight_through"][n].abs().sum() > 0 for n in routers)
    shared = [n for n in grads["straight_through"] if n not in routers]
    assert sorted(shared) == sorted(grads["none"]) and any("layers.0." in n for n in shared)
    for name in shared:
        torch.testing.assert_close(grads["straight_through"][name], grads["none"][name], msg=name)


def test_router_grad_none_keeps_routers_out_of_the_optimizer_and_unchanged():
    model = build(router_grad="none")
    routers = router_tensors(model)
    assert routers and all(name not in dict(model.named_parameters()) for name in routers)
    before = {n: t.clone() for n, t in routers.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all("mixlora_factors" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for step in range(3):
        model(**batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = router_tensors(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    factors = model.base_model.model.model.layers[0].self_attn.q_proj.mixlora_factors_b["default"]
    assert factors.abs().sum() > 0


def test_aux_loss_is_added_to_the_loss_and_reported():
    inputs = batch()
    plain = build(router_grad="scores").train()
    torch.manual_seed(0)
    base_loss = plain(**inputs).loss
    assert plain.base_model.router_aux_loss is None
    balanced = build(router_grad="scores", router_aux_loss_coef=0.1).train()
    torch.manual_seed(0)
    loss = balanced(**inputs).loss
    aux = balanced.base_model.router_aux_loss
    assert aux is not None and aux.item() > 0
    torch.testing.assert_close(loss, base_loss + aux)
    aux.backward()
    router = balanced.base_model.model.model.layers[0].self_attn.q_proj.mixlora_router["default"]
    assert router.weight_ifs.grad[0].abs().sum() > 0
    with torch.no_grad():  # not in evaluation
        balanced.eval()
        torch.testing.assert_close(balanced(**inputs).loss, plain.eval()(**inputs).loss)


def test_router_noise_changes_selection_in_training_only():
    model = build(router_noise=5.0)
    inputs = batch()
    selections = []
    for training in (False, False, True, True):
        model.train(training)
        torch.manual_seed(len(selections))
        with torch.no_grad(), cmlora.trace_routing(model) as trace:
            model(**inputs)
        selections.append(trace.indices("model.layers.0.self_attn.q_proj", "a"))
    assert torch.equal(selections[0], selections[1])
    assert not torch.equal(selections[2], selections[3])


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])  # PeftModel and PeftModelForCausalLM generate differently
def test_task_routing_gives_every_instance_of_a_task_the_same_selection(task_type):
    model = build(routing="task", num_tasks=3, task_type=task_type).eval()
    ids = random_tokens(6, 7, seed=3)
    tasks = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad(), cmlora.trace_routing(model) as trace:
        model(input_ids=ids, mixlora_task_ids=tasks)
    for layer in trace.layers:
        a = trace.indices(layer, "a")
        assert torch.equal(a[:3], a[3:])
    with pytest.raises(ValueError, match="mixlora_task_ids"):
        model(input_ids=ids)
    with cmlora.trace_routing(model) as generated:
        out = model.generate(input_ids=ids[:2], mixlora_task_ids=tasks[:2], max_new_tokens=3, do_sample=False,
                             pad_token_id=0, num_beams=2)
    assert out.shape == (2, 10)
    # beams repeat their instance's task: rows (0, 0, 1, 1) select like tasks 0 and 1 above
    for layer in trace.layers:
        expected = trace.indices(layer, "a")[:2].repeat_interleave(2, dim=0)
        assert torch.equal(generated.indices(layer, "a"), expected)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    grads = []
    for checkpointing in (False, True):
        model = build(router_grad="scores", lora_dropout=0.1)
        if checkpointing:
            model.base_model.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        calls = []
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        layer.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        model.train()
        torch.manual_seed(0)
        model(**batch()).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # the layer really was recomputed in backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
