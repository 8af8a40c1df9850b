"""The per-generation conditioner: right rows, one LLM batch per new text, one TSC pass per call."""

from __future__ import annotations

import pytest
import torch

from ella_ext import load_connector, load_text_encoder
from ella_ext.conditioning import Conditioner
from ella_ext.errors import InputError, TextEncoderError
from ella_ext.prompts import WeightedText

from .conftest import TINY, needs_cpu_fp16
from .reference_tsc import reference_tsc
from .test_text_encoders import direct_t5
from .tiny_llms import t5_token_weights

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture()
def parts(tiny_connector_file, tiny_t5_dir):
    connector = load_connector(tiny_connector_file, heads=TINY.heads)
    encoder = load_text_encoder(tiny_t5_dir)
    llm_calls = []
    encoder.model.register_forward_hook(lambda *_: llm_calls.append(1))
    return connector, encoder, llm_calls


def expected_row(connector, folder, text, timestep, max_length=None):
    args = {} if max_length is None else dict(max_length=max_length, padding="max_length", truncation=True)
    features, _ = direct_t5(folder, [text], **args)
    state = {k: v.detach() for k, v in connector.state_dict().items()}
    return reference_tsc(state, features, torch.tensor([float(timestep)]), TINY.heads)[0]


@pytest.mark.parametrize("max_length", [None, 12])
def test_rows_match_reference_run_alone(parts, tiny_t5_dir, max_length):
    connector, encoder, _ = parts
    cond = Conditioner(connector, encoder, max_length=max_length)
    texts = ["a red cube on top of a blue sphere", "", "three cats sitting on a wooden bench in the park", "a red cube"]
    timesteps = torch.tensor([999.0, 999.0, 10.5, 400.0])
    out = cond(texts, timesteps)
    assert out.shape == (4, TINY.num_latents, TINY.out_width)
    for row, (text, t) in enumerate(zip(texts, timesteps.tolist())):
        torch.testing.assert_close(out[row].double(), expected_row(connector, tiny_t5_dir, text, t, max_length), **TOL)


def test_llm_once_per_text_and_one_tsc_pass_per_call(parts):
    connector, encoder, llm_calls = parts
    cond = Conditioner(connector, encoder)
    cond.prepare(["cat", "dog", "cat", ""])
    assert len(llm_calls) == 1
    rows = ["cat", "cat", "dog", "dog", "", ""]  # cond rows then uncond rows, batch of 2 each... as a host lays them
    for step, t in enumerate([999.0, 800.0, 600.0]):
        out = cond(rows, t)
        assert cond.tsc_passes == step + 1  # exactly one TSC pass per call
        assert cond.tsc_pairs == 3 * (step + 1)  # identical rows computed once
        assert torch.equal(out[0], out[1]) and torch.equal(out[2], out[3]) and not torch.equal(out[0], out[2])
    assert len(llm_calls) == 1  # the LLM never ran on the per-call path


def test_repeated_timestep_is_reused(parts):
    connector, encoder, _ = parts
    cond = Conditioner(connector, encoder)
    first = cond(["cat", "dog"], 500.0)
    again = cond(["dog", "cat"], torch.tensor([500.0, 500.0]))
    assert cond.tsc_passes == 1
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    mixed = cond(["cat", "dog"], torch.tensor([500.0, 250.0]))  # only the new pair is computed
    assert cond.tsc_passes == 2 and cond.tsc_pairs == 3
    assert torch.equal(mixed[0], first[0])


def test_precompute_covers_a_schedule(parts, tiny_t5_dir):
    connector, encoder, _ = parts
    schedule = [999.0, 850.25, 700.5, 420.0, 100.0, 0.0]
    cond = Conditioner(connector, encoder)
    cond.precompute(schedule, texts=["cat", "dog"])
    passes = cond.tsc_passes
    assert passes == 1 and cond.tsc_pairs == 12
    for t in schedule:
        out = cond(["cat", "dog"], t)
        torch.testing.assert_close(out[1].double(), expected_row(connector, tiny_t5_dir, "dog", t), **TOL)
    assert cond.tsc_passes == passes


def test_new_text_mid_generation_is_encoded(parts, tiny_t5_dir):
    """Prompt editing switches the text at a step: the new text is encoded once and rows stay right."""
    connector, encoder, llm_calls = parts
    cond = Conditioner(connector, encoder)
    cond(["a cat"], 900.0)
    out = cond(["a cat on a long wooden bench in the park", "a cat"], 300.0)
    assert len(llm_calls) == 2
    torch.testing.assert_close(out[0].double(),
                               expected_row(connector, tiny_t5_dir, "a cat on a long wooden bench in the park", 300.0),
                               **TOL)
    torch.testing.assert_close(out[1].double(), expected_row(connector, tiny_t5_dir, "a cat", 300.0), **TOL)


def test_eviction_never_drops_what_the_call_needs(parts):
    connector, encoder, _ = parts
    cond = Conditioner(connector, encoder, cache_entries=2)
    cond(["cat"], 1.0)
    cond(["cat"], 2.0)
    out = cond(["cat", "cat"], [1.0, 3.0])  # one cached pair, one new: the new one must not evict the cached one
    torch.testing.assert_close(out[0], cond(["cat"], 1.0)[0])
    wide = cond(["cat", "dog", "cat", "dog"], [5.0, 5.0, 6.0, 6.0])  # more new pairs than the cache holds
    assert wide.shape[0] == 4 and not torch.equal(wide[0], wide[2])


def test_timestep_keys_round_through_fp32(parts):
    connector, encoder, _ = parts
    cond = Conditioner(connector, encoder)
    cond.precompute([412.37], texts=["cat"])
    cond(["cat"], torch.tensor([412.37]))
    cond(["cat"], 412.37)
    assert cond.tsc_passes == 1


def test_precompute_larger_than_the_cache_keeps_it_all(parts):
    connector, encoder, _ = parts
    cond = Conditioner(connector, encoder, cache_entries=4)
    cond.precompute([float(t) for t in range(10)], texts=["cat"])
    for t in range(10):
        cond(["cat"], float(t))
    assert cond.tsc_passes == 1


def test_cache_is_bounded_and_release_frees(parts):
    connector, encoder, _ = parts
    cond = Conditioner(connector, encoder, cache_entries=4)
    for t in range(10):
        cond(["cat"], float(t))
    assert len(cond._pairs) == 4
    cond.release()
    assert cond._features is None and not cond._pairs


def test_errors(parts, tiny_connector_file):
    connector, encoder, _ = parts
    cond = Conditioner(connector, encoder)
    with pytest.raises(InputError):
        cond([], 1.0)
    with pytest.raises(InputError):
        cond("cat", 1.0)
    with pytest.raises(InputError, match="3 timesteps for 2 rows"):
        cond(["a", "b"], [1.0, 2.0, 3.0])
    from ella_ext.connector import Connector, ConnectorConfig

    wide = Connector(ConnectorConfig(time_channels=8, time_embed_dim=8, width=8, layers=1, heads=2, num_latents=2,
                                     input_dim=2048))
    with pytest.raises(TextEncoderError, match="reads 2048-wide"):
        Conditioner(wide, encoder)


@needs_cpu_fp16
def test_half_precision_connector(parts, tiny_connector_file):
    """An fp16 connector (as on a GPU) with fp32 LLM features: fp16 rows, close to the fp32 conditioner's."""
    connector, encoder, _ = parts
    half = load_connector(tiny_connector_file, heads=TINY.heads, dtype=torch.float16)
    texts, t = ["a red cube", "three cats", ""], [999.0, 500.5, 3.0]
    low = Conditioner(half, encoder)(texts, t)
    full = Conditioner(connector, encoder)(texts, t)
    assert low.dtype == torch.float16 and low.shape == full.shape
    assert ((low.float() - full).norm() / full.norm()) < 0.02  # fp16 weights and arithmetic, amplified by the toy net


def test_working_bytes_bounds_the_results_calls_add(parts):
    connector, encoder, _ = parts
    cond = Conditioner(connector, encoder, cache_entries=16)
    texts = ["a red cube on top of a blue sphere", "blurry"]
    cond.prepare(texts)
    bound = cond.working_bytes(rows=2, calls=5)
    assert bound < cond.working_bytes(rows=4, calls=5) and bound < cond.working_bytes(rows=2, calls=6)

    def held():
        return sum(t.numel() * t.element_size() for t in cond._pairs.values())

    for t in (999.0, 800.0, 600.0, 400.0, 200.0):
        cond(texts, [t, t])
    added = held()
    assert 0 < added <= bound
    # a full cache evicts instead of growing: only one pass's activations remain to reserve
    for t in range(50):
        cond(texts, [float(t), float(t)])
    assert len(cond._pairs) == 16
    assert cond.working_bytes(rows=2, calls=5) == bound - added


# -- arrangements: a pass's pairs computed in a few large TSC passes, ahead or at the calls that need them ---------

SCHEDULE = [999.0, 850.25, 700.5, 420.0, 100.0, 0.0]
CALL_TEXTS = ["cat", "a dog on a mat", "cat", ""]  # cond rows then uncond rows, with a repeated text


def _calls(schedule=SCHEDULE, texts=CALL_TEXTS):
    return [[(text, t) for text in texts] for t in schedule]


@pytest.mark.parametrize("max_length", [None, 12])
def test_arranged_pass_computed_ahead_then_looked_up(parts, tiny_t5_dir, max_length):
    connector, encoder, _ = parts
    cond = Conditioner(connector, encoder, max_length=max_length)
    assert cond.arrange(_calls(), max_bytes=None) is True
    assert cond.tsc_passes == 1 and cond.tsc_pairs == 3 * len(SCHEDULE)  # distinct pairs only, one pass
    for t in SCHEDULE:
        out = cond.lookup(CALL_TEXTS, [t] * len(CALL_TEXTS))
        assert out.shape == (4, TINY.num_latents, TINY.out_width) and torch.equal(out[0], out[2])
        for row, text in enumerate(CALL_TEXTS):
            torch.testing.assert_close(out[row].double(), expected_row(connector, tiny_t5_dir, text, t, max_length),
                                       **TOL)
    assert cond.tsc_passes == 1  # every call was a lookup


def test_arranged_rows_are_the_same_ahead_or_at_the_calls(parts, monkeypatch):
    """Above the memory bound each chunk is computed at the first call that needs it: the same TSC passes over the
    same pairs as ahead, so the same rows to the last bit; and at most one chunk is kept."""
    from ella_ext import conditioning

    connector, encoder, _ = parts
    monkeypatch.setattr(conditioning, "TSC_CHUNK", 7)  # two timesteps (3 distinct pairs each) per chunk
    ahead, at_calls = Conditioner(connector, encoder), Conditioner(connector, encoder)
    assert ahead.arrange(_calls(), max_bytes=10**9) is True
    assert at_calls.arrange(_calls(), max_bytes=0) is False
    assert ahead.tsc_passes == 3 and at_calls.tsc_passes == 0  # 6 timesteps in chunks of 2 timesteps
    for step, t in enumerate(SCHEDULE):
        rows = at_calls.lookup(CALL_TEXTS, [t] * 4)
        assert torch.equal(rows, ahead.lookup(CALL_TEXTS, [t] * 4))
        assert at_calls.tsc_passes == step // 2 + 1 and len(at_calls._resident) == 1
    assert ahead.tsc_passes == 3
    # a row computed per call (a TSC pass over other rows) is the same number, not always the same bits
    per_call = Conditioner(connector, encoder)
    for t in SCHEDULE:
        torch.testing.assert_close(per_call(CALL_TEXTS, t), ahead.lookup(CALL_TEXTS, [t] * 4), atol=1e-5, rtol=1e-5)


def test_chunks_hold_whole_timesteps_and_the_bound_keeps_enough(parts, monkeypatch):
    from ella_ext import conditioning

    connector, encoder, _ = parts
    monkeypatch.setattr(conditioning, "TSC_CHUNK", 4)  # 3 pairs per timestep: a chunk is one timestep
    cond = Conditioner(connector, encoder)
    row_bytes = TINY.num_latents * TINY.out_width * 4
    assert cond.arrange(_calls(), max_bytes=2 * 3 * row_bytes) is False  # two chunks fit, not six
    assert [len(chunk) for chunk in cond._chunks] == [3] * len(SCHEDULE)
    for t in SCHEDULE:
        cond.lookup(CALL_TEXTS, [t] * 4)
    assert cond.tsc_passes == len(SCHEDULE) and len(cond._resident) == 2
    first = cond.tsc_passes
    cond.lookup(CALL_TEXTS, [SCHEDULE[0]] * 4)  # an evicted chunk is computed again, by the same pass
    assert cond.tsc_passes == first + 1


def test_a_pair_not_arranged_is_computed_per_call(parts, tiny_t5_dir):
    connector, encoder, _ = parts
    cond = Conditioner(connector, encoder)
    cond.arrange(_calls(), max_bytes=None)
    out = cond(["cat", "a dog on a mat"], 512.5)  # a timestep no call was foreseen to ask for
    assert cond.tsc_passes == 2 and cond.tsc_pairs == 3 * len(SCHEDULE) + 2
    torch.testing.assert_close(out[1].double(), expected_row(connector, tiny_t5_dir, "a dog on a mat", 512.5), **TOL)
    mixed = cond(["cat", "a new text"], [999.0, 999.0])  # one arranged pair, one new text
    assert cond.tsc_passes == 3
    assert torch.equal(mixed[0], cond.lookup(["cat"], [999.0])[0])
    torch.testing.assert_close(mixed[1].double(), expected_row(connector, tiny_t5_dir, "a new text", 999.0), **TOL)


def test_a_foreseen_call_is_one_gather(parts):
    """The per-call work of a foreseen call: one indexing operation (counted, not timed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    connector, encoder, _ = parts
    cond = Conditioner(connector, encoder)
    cond.arrange(_calls(), max_bytes=None)
    for t in SCHEDULE:  # every foreseen call, the first included: its gather was prepared with the arrangement
        with Count() as count:
            cond.lookup(CALL_TEXTS, [t] * 4)
        assert count.ops == ["index_select.default"]


def test_working_bytes_counts_the_rows_kept_ahead(parts, monkeypatch):
    from ella_ext import conditioning

    connector, encoder, _ = parts
    monkeypatch.setattr(conditioning, "TSC_CHUNK", 6)  # 24 pairs: four chunks of 6
    cond = Conditioner(connector, encoder, cache_entries=0)
    cond.prepare(CALL_TEXTS)
    row_bytes = TINY.num_latents * TINY.out_width * 4
    one_chunk = cond.working_bytes(rows=4, calls=6)
    assert cond.working_bytes(rows=4, calls=6, ahead_bytes=10**9) - one_chunk == (24 - 6) * row_bytes
    assert cond.working_bytes(rows=4, calls=6, ahead_bytes=12 * row_bytes) - one_chunk == (12 - 6) * row_bytes
    cond.arrange([[(text, t) for text in ["cat", "a dog on a mat", "blurry", ""]] for t in SCHEDULE], max_bytes=None)
    held = sum(t.numel() * t.element_size() for t in cond._resident.values())
    assert held == 24 * row_bytes <= cond.working_bytes(rows=4, calls=6, ahead_bytes=10**9)


# -- emphasis ------------------------------------------------------------------------------------------------------


def expected_weighted_row(connector, folder, text, timestep, max_length=None):
    args = {} if max_length is None else dict(max_length=max_length, padding="max_length", truncation=True)
    plain = text.text if isinstance(text, WeightedText) else text
    features, _ = direct_t5(folder, [plain], **args)
    weights = None
    if isinstance(text, WeightedText):
        weights = t5_token_weights(folder, text.text, text.weights, max_length)[None]
        assert weights.shape == features.shape[:2]
    state = {k: v.detach() for k, v in connector.state_dict().items()}
    return reference_tsc(state, features, torch.tensor([float(timestep)]), TINY.heads, weights=weights)[0]


@pytest.mark.parametrize("max_length", [None, 12])
def test_weighted_rows_match_the_reference(parts, tiny_t5_dir, max_length):
    connector, encoder, _ = parts
    cond = Conditioner(connector, encoder, max_length=max_length)
    texts = [WeightedText("a red cube on top of a blue sphere", (1.0, 1.5, 2.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0)),
             "three cats", WeightedText("red cube", (0.5, 3.0)), ""]
    timesteps = [999.0, 500.5, 10.0, 640.0]
    out = cond(texts, timesteps)
    assert cond.tsc_passes == 1  # rows with and without weights, different weights: one pass
    for row, (text, t) in enumerate(zip(texts, timesteps)):
        expected = expected_weighted_row(connector, tiny_t5_dir, text, t, max_length)
        torch.testing.assert_close(out[row].double(), expected, **TOL)


def test_weights_are_part_of_the_key(parts):
    connector, encoder, llm_calls = parts
    cond = Conditioner(connector, encoder)
    texts = [WeightedText("red cube", (2.0, 1.0)), "red cube", WeightedText("red cube", (0.5, 1.0)),
             WeightedText("red cube", (2.0, 1.0))]
    out = cond(texts, 500.0)
    assert len(llm_calls) == 1  # the words are encoded once
    assert cond.tsc_pairs == 3 and torch.equal(out[0], out[3])
    assert not torch.allclose(out[0], out[1], atol=1e-4) and not torch.allclose(out[2], out[1], atol=1e-4)
    again = cond(list(reversed(texts)), 500.0)
    assert cond.tsc_passes == 1 and torch.equal(again[1], out[2])


def test_a_pass_without_weights_hands_the_connector_none(parts, monkeypatch):
    connector, encoder, _ = parts
    seen = []
    forward = type(connector).forward
    monkeypatch.setattr(type(connector), "forward",
                        lambda self, f, t, mask=None, weights=None: seen.append(weights) or forward(self, f, t, mask,
                                                                                                    weights))
    cond = Conditioner(connector, encoder)
    cond.prepare(["blurry", WeightedText("red cube", (1.5, 1.0))])
    cond(["blurry", "a cat"], 900.0)
    assert seen == [None]
    cond([WeightedText("red cube", (1.5, 1.0)), "blurry"], 800.0)
    assert seen[1].device.type == "cpu" and seen[1][1].tolist() == [1.0] * seen[1].shape[1]
    assert 1.5 in seen[1][0].tolist()


def test_emphasis_from_the_prompt_to_the_rows(parts, tiny_t5_dir):
    """Host syntax (nested emphasis, BREAK, AND, square brackets) -> per-word weights -> rows."""
    from ella_ext.pass_rows import PassTexts

    connector, encoder, _ = parts
    texts = PassTexts(["((red) cube:1.2) BREAK on a [table] AND (blue:0.5) sphere"], ["(ugly:1.3), blurry"], steps=4,
                      emphasis=True)
    cond_texts, uncond_texts = texts.at(0)
    assert cond_texts == [WeightedText("red cube on a table", pytest.approx((1.32, 1.2, 1.0, 1.0, 1 / 1.1))),
                          WeightedText("blue sphere", (0.5, 1.0))]
    assert uncond_texts == [WeightedText("ugly, blurry", (1.3, 1.0))]
    plain = PassTexts(["((red) cube:1.2) BREAK on a [table]"], ["blurry"], steps=4, emphasis=True)
    assert plain.at(0)[1] == ["blurry"]  # no emphasis: a plain text, the same key as with emphasis off
    off = PassTexts(["((red) cube:1.2) BREAK on a [table]"], [""], steps=4)
    assert off.at(0)[0] == ["red cube on a table"]
    rows = Conditioner(connector, encoder)([*cond_texts, *uncond_texts], 700.0)
    for row, text in enumerate([*cond_texts, *uncond_texts]):
        torch.testing.assert_close(rows[row].double(), expected_weighted_row(connector, tiny_t5_dir, text, 700.0),
                                   **TOL)


def test_out_of_range_emphasis_is_clamped_and_reported():
    from ella_ext.pass_rows import PassTexts

    texts = PassTexts(["(red:20) [(blue:-1)] cube", "(a:10) b"], [""], steps=2, emphasis=True)
    assert texts.at(0)[0] == [WeightedText("red blue cube", (10.0, 0.0, 1.0)), WeightedText("a b", (10.0, 1.0))]
    assert sorted(texts.out_of_range) == pytest.approx([-1 / 1.1, 20.0])
