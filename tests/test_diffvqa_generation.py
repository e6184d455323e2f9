"""generate() is GenerationMixin's: strategies, streamers, stopping criteria, caches and compilation."""

import pytest
import torch
from conftest import enable_activation_checkpointing, make_pair, visual_features
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation import CompileConfig
from transformers.generation.streamers import BaseStreamer


def _inputs(batch=2, prompt_length=6, vis_dim=768, num_curr=10, num_ref=8, seed=0):
    curr_vis, ref_vis = visual_features(batch, num_curr, num_ref, vis_dim, seed=seed)
    input_ids = torch.randint(0, 50256, (batch, prompt_length), generator=torch.Generator().manual_seed(seed))
    input_ids[:, -1] = 50256  # bos
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        current_image_features=curr_vis,
        prior_image_features=ref_vis,
    )


class CallCounter:
    def __init__(self, modules):
        self.calls = 0
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, *_):
        self.calls += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_visual_keys_values_are_computed_once_per_sequence(num_beams):
    _, model = make_pair(768)
    cross_key_projections = [layer.encoder_attn.k_proj for layer in model.decoder.layers]
    counter = CallCounter([model.visual_projection, *cross_key_projections])
    model.generate(**_inputs(), max_new_tokens=8, num_beams=num_beams, do_sample=False, min_new_tokens=8)
    counter.remove()
    # One visual projection per image (ref, curr) and one cross key projection per layer, for the whole run.
    assert counter.calls == 2 + len(cross_key_projections)


def test_generate_uses_the_kv_cache():
    _, model = make_pair(768)
    seen_lengths = []
    handle = model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen_lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    model.generate(**_inputs(prompt_length=6), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    handle.remove()
    assert seen_lengths == [6, 1, 1, 1, 1]


def test_beam_search_returns_sequences_and_scores():
    _, model = make_pair(768)
    out = model.generate(
        **_inputs(),
        max_new_tokens=6,
        num_beams=4,
        num_return_sequences=2,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.shape[0] == 4
    assert out.sequences_scores.shape == (4,)
    assert out.sequences.shape[1] <= 6 + 6


def test_beam_search_with_one_beam_is_greedy():
    _, model = make_pair(768)
    inputs = _inputs()
    greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    beam = model.generate(**inputs, max_new_tokens=6, num_beams=1, do_sample=False)
    assert torch.equal(greedy, beam)


def test_sampling_is_seeded_and_varies():
    _, model = make_pair(768, std=0.02)
    inputs = _inputs()
    torch.manual_seed(0)
    first = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=0, temperature=2.0)
    torch.manual_seed(0)
    again = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=0, temperature=2.0)
    torch.manual_seed(1)
    other = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=0, temperature=2.0)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_every_token():
    _, model = make_pair(768)
    inputs = _inputs(batch=1)
    streamer = RecordingStreamer()
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, streamer=streamer)
    assert streamer.ended
    assert streamer.chunks[0] == inputs["input_ids"][0].tolist()
    assert [c[0] for c in streamer.chunks[1:]] == out[0, 6:].tolist()


class StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_stopping_criteria_are_honoured():
    _, model = make_pair(768)
    out = model.generate(
        **_inputs(),
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([StopAfter(9)]),
    )
    assert out.shape[1] == 9


def test_user_supplied_dynamic_cache_is_accepted():
    _, model = make_pair(768)
    inputs = _inputs()
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    found = model.generate(**inputs, past_key_values=DynamicCache(), max_new_tokens=6, do_sample=False)
    assert torch.equal(expected, found)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_static_cache_matches_dynamic(attn_implementation):
    _, model = make_pair(768, attn_implementation=attn_implementation)
    inputs = _inputs()
    inputs["attention_mask"][0, :2] = 0  # left padding on the first sample
    dynamic = model.generate(**inputs, max_new_tokens=7, min_new_tokens=7, do_sample=False)
    static = model.generate(
        **inputs, max_new_tokens=7, min_new_tokens=7, do_sample=False, cache_implementation="static"
    )
    assert torch.equal(dynamic, static)


def test_static_cache_with_torch_compile_matches_eager_generation():
    _, model = make_pair(768, attn_implementation="sdpa")
    inputs = _inputs()
    expected = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager")
    compile_config._compile_all_devices = True  # generate() compiles only on accelerators by default
    torch._dynamo.reset()
    calls = []
    original_get_compiled_call = model.get_compiled_call
    model.get_compiled_call = lambda cfg: calls.append(cfg) or original_get_compiled_call(cfg)
    found = model.generate(
        **inputs,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        cache_implementation="static",
        compile_config=compile_config,
    )
    assert calls, "generate() did not take the compiled path"
    assert torch.equal(expected, found)


def test_loss_is_cross_entropy_on_answer_tokens_only():
    _, model = make_pair(768)
    inputs = _inputs(prompt_length=10)
    labels = inputs["input_ids"].clone()
    labels[:, :6] = -100  # the question and bos are not scored
    out = model(
        input_ids=inputs["input_ids"],
        current_image_features=inputs["current_image_features"],
        prior_image_features=inputs["prior_image_features"],
        labels=labels,
    )
    shifted_logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(shifted_logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_loss_normalised_by_num_items_in_batch_for_gradient_accumulation():
    _, model = make_pair(768)
    inputs = _inputs(prompt_length=10)
    labels = inputs["input_ids"].clone()
    labels[:, :6] = -100
    out = model(**inputs, labels=labels, num_items_in_batch=torch.tensor(100))
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    summed = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert torch.allclose(out.loss, summed / 100, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    inputs = _inputs(prompt_length=8)
    del inputs["attention_mask"]
    for checkpointing in (False, True):
        _, model = make_pair(768)
        model.train()
        if checkpointing:
            enable_activation_checkpointing(model)
        torch.manual_seed(0)  # checkpointing replays the same dropout masks
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append(model.visual_projection.weight.grad.clone())
    assert model.decoder.layers[0].gradient_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_hidden_states_and_attentions_on_request():
    _, model = make_pair(768)
    inputs = _inputs(prompt_length=5, num_curr=10, num_ref=8)
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1
    assert len(out.attentions) == layers and out.attentions[0].shape == (2, 4, 5, 5)
    assert len(out.cross_attentions) == layers and out.cross_attentions[0].shape == (2, 4, 5, 18)
