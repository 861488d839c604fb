"""Routing inputs come from the model call itself (issue #2, behaviours 2-4): masks, batch invariance, KV caches."""

import inspect

import pytest
import torch
from peft import get_peft_model
from transformers import DynamicCache, LlamaForCausalLM

import cmlora
from cmlora import MixLoraConfig
from cmlora.routing import pool, route

from .conftest import left_pad, positions, random_tokens, right_pad, tiny_llama

LAYER = "model.layers.1.self_attn.v_proj"


def mixlora(pooling="prompt", **kwargs):
    config = dict(num_factors=8, r=2, target_modules=["q_proj", "v_proj", "down_proj"], pooling=pooling,
                  init_weights=False)
    config.update(kwargs)
    return get_peft_model(tiny_llama(), MixLoraConfig(**config)).eval()


def layer_input(model, **call):
    """The input of LAYER's base linear during one call, and the routing trace of that call."""
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad(), cmlora.trace_routing(model) as trace:
        model(**call)
    handle.remove()
    return layer, seen[0], trace


@pytest.mark.parametrize("pooling", ["prompt", "all", "reference"])
def test_pooling_mask_comes_from_attention_mask_and_labels(pooling):
    model = mixlora(pooling)
    ids, mask = right_pad([random_tokens(1, 7, seed=1)[0], random_tokens(1, 4, seed=2)[0]])
    labels = ids.clone()
    labels[:, :3] = -100          # prompt: the first 3 tokens
    labels[mask == 0] = -100      # padding is never a target
    layer, x, trace = layer_input(model, input_ids=ids, attention_mask=mask, labels=labels)
    wanted = {"prompt": (mask == 1) & (labels == -100), "all": mask == 1, "reference": None}[pooling]
    if pooling == "prompt":  # the 3 prompt tokens, not the padding that is also labelled -100
        assert wanted.sum(dim=1).tolist() == [3, 3]
    router = layer.mixlora_router["default"]
    expected = route(pool(x, wanted), r=2, num_factors=8, routing="ifs+cfs", router_grad="none",
                     factors_a=layer.mixlora_factors_a["default"], router_ifs=router.weight_ifs,
                     router_cfs=router.weight_cfs)
    assert torch.equal(trace.indices(LAYER, "a"), expected.index_a)
    assert torch.equal(trace.indices(LAYER, "b"), expected.index_b)


def test_generate_routes_on_the_prompt_with_its_attention_mask():
    model = mixlora("prompt")
    ids, mask = left_pad([random_tokens(1, 6, seed=3)[0], random_tokens(1, 3, seed=4)[0]])
    with torch.no_grad(), cmlora.trace_routing(model) as direct:
        model(input_ids=ids, attention_mask=mask)
    with cmlora.trace_routing(model) as generated:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    # one record per layer: the prefill; decode steps reuse it
    assert len(generated.records[LAYER]) == 1
    assert torch.equal(direct.indices(LAYER, "a"), generated.indices(LAYER, "a"))
    assert torch.equal(direct.indices(LAYER, "b"), generated.indices(LAYER, "b"))


def logits_of(model, rows, padding, labels_prompt_len=None):
    ids, mask = (left_pad if padding == "left" else right_pad)(rows)
    call = dict(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    if labels_prompt_len is not None:
        labels = ids.clone()
        for i, row in enumerate(rows):
            start = ids.shape[1] - len(row) if padding == "left" else 0
            labels[i, : start + labels_prompt_len[i]] = -100
        labels[mask == 0] = -100
        call["labels"] = labels
    with torch.no_grad():
        logits = model(**call).logits
    width = ids.shape[1]
    return [logits[i, width - len(r):] if padding == "left" else logits[i, : len(r)] for i, r in enumerate(rows)]


@pytest.mark.parametrize("pooling", ["prompt", "all"])
def test_logits_do_not_depend_on_batch_mates_or_padding_side(pooling):
    model = mixlora(pooling)
    target = random_tokens(1, 5, seed=10)[0]
    alone = logits_of(model, [target], "right", labels_prompt_len=[3])[0]
    mates = [random_tokens(1, n, seed=20 + n)[0] for n in (9, 2)]
    for padding in ("left", "right"):
        batched = logits_of(model, [mates[0], target, mates[1]], padding, labels_prompt_len=[4, 3, 1])[1]
        assert (batched - alone).abs().max().item() <= 1e-5


def test_reference_pooling_depends_on_padding():
    """The reference code's unmasked mean: why 'prompt' and 'all' exist."""
    model = mixlora("reference")
    target = random_tokens(1, 5, seed=10)[0]
    alone = logits_of(model, [target], "right")[0]
    with cmlora.trace_routing(model) as alone_trace:
        logits_of(model, [target], "right")
    with cmlora.trace_routing(model) as batched_trace:
        batched = logits_of(model, [target, random_tokens(1, 12, seed=5)[0]], "right")[0]
    changed = any(not torch.equal(alone_trace.indices(n, "a")[0], batched_trace.indices(n, "a")[0])
                  for n in alone_trace.layers)
    assert changed and (batched - alone).abs().max().item() > 1e-4


# The names a model call takes its KV cache by: transformers 5.24 renamed `past_key_values` to `cache` (what
# generate passes) and accepts the old name until 5.40; earlier 5.x releases know only the old one.
CACHE_KEYWORDS = [name for name in ("cache", "past_key_values")
                  if name == "past_key_values" or name in inspect.signature(LlamaForCausalLM.forward).parameters]


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_teacher_forcing_equals_prefill_then_cached_steps(keyword):
    model = mixlora("prompt")
    prompt, answer = random_tokens(1, 6, seed=7), random_tokens(1, 4, seed=8)
    full = torch.cat([prompt, answer], dim=1)
    labels = full.clone()
    labels[:, : prompt.shape[1]] = -100
    with torch.no_grad():
        forced = model(input_ids=full, labels=labels).logits
        cache = DynamicCache()
        steps = [model(input_ids=prompt, **{keyword: cache}, use_cache=True).logits[:, -1]]
        for t in range(answer.shape[1] - 1):
            steps.append(model(input_ids=answer[:, t: t + 1], **{keyword: cache}, use_cache=True).logits[:, -1])
    incremental = torch.stack(steps, dim=1)
    assert (forced[:, prompt.shape[1] - 1: -1] - incremental).abs().max().item() <= 1e-4


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_continuing_a_cache_without_a_prefill_is_an_error(keyword):
    model = mixlora("prompt")
    other = tiny_llama()
    cache = DynamicCache()
    with torch.no_grad():
        other(input_ids=random_tokens(2, 3), **{keyword: cache}, use_cache=True)
        model.base_model.routing_context._selections.clear()
        with pytest.raises(RuntimeError, match="holds no routing from a prefill"):
            model(input_ids=random_tokens(2, 1), **{keyword: cache}, use_cache=True)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_generate_modes(mode):
    model = mixlora("prompt")
    ids, mask = left_pad([random_tokens(1, 6, seed=3)[0], random_tokens(1, 3, seed=4)[0]])
    options = {"greedy": dict(do_sample=False), "sample": dict(do_sample=True, top_k=5),
               "beam": dict(do_sample=False, num_beams=3)}[mode]
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, **options)
    assert out.shape == (2, ids.shape[1] + 4)
    if mode == "greedy":  # greedy decoding = argmax of teacher-forced logits over its own output
        with torch.no_grad():
            full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
            labels = out.clone()
            labels[:, : ids.shape[1]] = -100
            logits = model(input_ids=out, attention_mask=full_mask, position_ids=positions(full_mask),
                           labels=labels).logits
        assert torch.equal(logits[:, ids.shape[1] - 1: -1].argmax(-1), out[:, ids.shape[1]:])
