"""The TSC against an independent literal computation of the reference (tests/reference_tsc.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ella_ext import load_connector
from ella_ext.connector import Connector, ConnectorConfig
from ella_ext.connector_file import read_config, save_connector
from ella_ext.errors import ConnectorLoadError, InputError

from .conftest import CPU_FP16, TINY, make_connector, needs_cpu_fp16
from .random_weights import init_random
from .reference_tsc import reference_tsc, sinusoid

# The official file's tensor names and shapes (a copy of the team's shared/ella-sd15-tsc-t5xl.keys.json).
OFFICIAL_KEYS = Path(__file__).resolve().parent / "data" / "ella-sd15-tsc-t5xl.keys.json"
TOL = dict(atol=1e-5, rtol=1e-5)


def features(batch, tokens, width=TINY.in_width, seed=1):
    return torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(seed))


def state_of(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("timesteps", [999, 0.0, 412.37, "per-row"])
def test_matches_reference_fixed(tiny_connector_file, batch, timesteps):
    model = load_connector(tiny_connector_file)
    x = features(batch, 11)
    if timesteps == "per-row":
        timesteps = torch.linspace(0, 999, batch) + 0.25
    out = model(x, timesteps)
    ref = reference_tsc(state_of(model), x, torch.as_tensor(timesteps, dtype=torch.float32), TINY.heads)
    assert out.shape == (batch, TINY.num_latents, TINY.out_width)
    torch.testing.assert_close(out.double(), ref, **TOL)


def test_timestep_forms_agree(tiny_connector_file):
    model = load_connector(tiny_connector_file)
    x = features(3, 7)
    expected = model(x, torch.tensor([500.0, 500.0, 500.0]))
    for form in (500, 500.0, torch.tensor(500.0), torch.tensor([500.0]), torch.tensor([500], dtype=torch.int64)):
        torch.testing.assert_close(model(x, form), expected, **TOL)


def test_timestep_changes_output(tiny_connector_file):
    model = load_connector(tiny_connector_file)
    x = features(1, 5)
    assert not torch.allclose(model(x, 10.0), model(x, 900.0), atol=1e-3)


def test_masked_batch_equals_each_row_alone(tiny_connector_file):
    """Batched flexible length: each row equals the reference on that row alone, unpadded."""
    model = load_connector(tiny_connector_file)
    lengths = [3, 9, 1, 6]
    x = features(len(lengths), max(lengths))
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~mask[..., None], 123.0)  # garbage in the padding must not matter
    timesteps = torch.tensor([1.0, 250.5, 700.0, 999.0])
    out = model(x, timesteps, mask)
    state = state_of(model)
    for row, length in enumerate(lengths):
        alone = reference_tsc(state, x[row : row + 1, :length], timesteps[row : row + 1], TINY.heads)
        torch.testing.assert_close(out[row : row + 1].double(), alone, **TOL)


def test_without_mask_padding_is_attended(tiny_connector_file):
    model = load_connector(tiny_connector_file)
    x = features(1, 6)
    full = model(x, 300.0)
    masked = model(x, 300.0, torch.tensor([[True] * 3 + [False] * 3]))
    assert not torch.allclose(full, masked, atol=1e-4)


def test_proj_out_and_no_proj_in(tmp_path):
    cfg = ConnectorConfig(time_channels=8, time_embed_dim=16, width=16, layers=1, heads=2, num_latents=4,
                          input_dim=None, output_dim=12)
    model = init_random(Connector(cfg), torch.Generator().manual_seed(3), std=0.3)
    save_connector(model, tmp_path / "c.safetensors")
    loaded = load_connector(tmp_path / "c.safetensors")
    assert loaded.config == cfg
    x = features(2, 5, width=16)
    torch.testing.assert_close(loaded(x, torch.tensor([3.0, 800.0])).double(),
                               reference_tsc(state_of(loaded), x, torch.tensor([3.0, 800.0]), 2), **TOL)


def test_official_layout_loads_strictly(tmp_path):
    shapes = json.loads(OFFICIAL_KEYS.read_text())
    assert len(shapes) == 93
    cfg = ConnectorConfig()
    assert {k: list(v) for k, v in cfg.expected_shapes().items()} == shapes
    # A file with exactly these tensors (zeros: 66.8 M parameters, ~270 MB on disk in fp32; 16 bits halve it).
    path = tmp_path / "ella-sd1.5-tsc-t5xl.safetensors"
    save_file({k: torch.zeros(v, dtype=torch.float16) for k, v in shapes.items()}, str(path))
    assert read_config(path) == cfg
    model = load_connector(path, dtype=torch.bfloat16)  # bf16 runs on every stack's CPU, fp16 not on torch 2.1
    assert sum(p.numel() for p in model.parameters()) == sum(torch.Size(v).numel() for v in shapes.values())
    assert model.dtype == torch.bfloat16
    out = model(torch.zeros(1, 4, 2048), 10)
    assert out.shape == (1, 64, 768)


def test_heads_from_argument_and_metadata(tmp_path):
    model = make_connector()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "plain.safetensors"))
    assert read_config(tmp_path / "plain.safetensors").heads == 8  # the default
    assert read_config(tmp_path / "plain.safetensors", heads=4).heads == 4
    save_file(state, str(tmp_path / "meta.safetensors"), metadata={"ella.heads": "2"})
    assert read_config(tmp_path / "meta.safetensors").heads == 2
    assert read_config(tmp_path / "meta.safetensors", heads=4).heads == 4
    with pytest.raises(ConnectorLoadError, match="heads"):
        read_config(tmp_path / "plain.safetensors", heads=5)
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"ella.heads": "eight"})
    with pytest.raises(ConnectorLoadError, match="ella.heads"):
        read_config(tmp_path / "bad.safetensors")


def _save_variant(tmp_path, mutate):
    state = {k: v.contiguous() for k, v in make_connector().state_dict().items()}
    mutate(state)
    path = tmp_path / "variant.safetensors"
    save_file(state, str(path))
    return path


def test_missing_tensor_is_named(tmp_path):
    path = _save_variant(tmp_path, lambda s: s.pop("connector.perceiver_blocks.1.mlp.c_fc.bias"))
    with pytest.raises(ConnectorLoadError, match=r"missing tensors: connector\.perceiver_blocks\.1\.mlp\.c_fc\.bias"):
        load_connector(path, heads=4)


def test_unexpected_tensor_is_named(tmp_path):
    path = _save_variant(tmp_path, lambda s: s.__setitem__("connector.extra", torch.zeros(2)))
    with pytest.raises(ConnectorLoadError, match=r"unexpected tensors: connector\.extra"):
        load_connector(path, heads=4)


def test_misshaped_tensor_is_named(tmp_path):
    path = _save_variant(tmp_path, lambda s: s.__setitem__("connector.perceiver_blocks.0.ln_2.linear.bias",
                                                           torch.zeros(63)))
    with pytest.raises(ConnectorLoadError, match=r"wrong shape: connector\.perceiver_blocks\.0\.ln_2\.linear\.bias"
                                                 r" \[63\] \(expected \[64\]\)"):
        load_connector(path, heads=4)


def test_not_a_connector(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ConnectorLoadError, match="not an ELLA connector"):
        load_connector(path)
    flat = _save_variant(tmp_path, lambda s: s.__setitem__("connector.latents", torch.zeros(64)))
    with pytest.raises(ConnectorLoadError, match="connector.latents should be 2-D"):
        load_connector(flat)


def test_missing_corrupt_and_pickle_files(tmp_path, tiny_connector_file):
    with pytest.raises(ConnectorLoadError, match="No connector file"):
        load_connector(tmp_path / "absent.safetensors")
    truncated = tmp_path / "partial.safetensors"
    truncated.write_bytes(tiny_connector_file.read_bytes()[:200])
    with pytest.raises(ConnectorLoadError, match="corrupt or a partial download"):
        load_connector(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ConnectorLoadError, match="corrupt"):
        load_connector(garbage)
    pickle = tmp_path / "ella.pt"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(ConnectorLoadError, match="safetensors only"):
        load_connector(pickle)


def test_bad_inputs(tiny_connector_file):
    model = load_connector(tiny_connector_file)
    with pytest.raises(InputError, match="20-wide"):
        model(torch.zeros(1, 3, 19), 1.0)
    with pytest.raises(InputError, match="shape"):
        model(torch.zeros(3, 20), 1.0)
    with pytest.raises(InputError, match="3 timesteps for 2 rows"):
        model(torch.zeros(2, 3, 20), torch.zeros(3))
    with pytest.raises(InputError, match="mask"):
        model(torch.zeros(2, 3, 20), 1.0, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="empty"):
        model(torch.zeros(0, 3, 20), 1.0)


def test_modulation_follows_parameter_changes(tiny_connector_file):
    model = load_connector(tiny_connector_file)
    x = features(1, 4)
    before = model(x, 100.0)
    with torch.no_grad():
        model.connector.perceiver_blocks[0].ln_1.linear.bias.add_(0.5)
    after = model(x, 100.0)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after.double(), reference_tsc(state_of(model), x, torch.tensor([100.0]), TINY.heads),
                               **TOL)


def _tensors_beside_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors the module objects hold outside their parameters and buffers (memory nobody counts)."""
    found, stack = [], [v for m in model.modules() for k, v in vars(m).items()
                        if k not in ("_parameters", "_buffers", "_modules")]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            stack += value.values()
        elif isinstance(value, (list, tuple)):
            stack += value
    return found


def test_no_weight_copies_beside_the_parameters(tiny_connector_file):
    """What a connector occupies is its parameters and buffers, which is what the WebUI asks room for (Forge's
    free_memory): after running, it holds at most the timestep frequencies (one small vector per device)."""
    model = load_connector(tiny_connector_file)
    with torch.inference_mode():
        model(features(2, 4), torch.tensor([999.0, 1.0]))
    weights = sum(p.numel() for p in model.parameters())
    extra = sum(t.numel() for t in _tensors_beside_parameters(model))
    assert extra <= model.config.time_channels, f"{extra} values held beside {weights} parameters"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_time_features_stay_fp32(tiny_connector_file, dtype):
    """diffusers computes the sinusoid in fp32 whatever the model's dtype; so must we (before the time MLP)."""
    model = load_connector(tiny_connector_file, dtype=dtype)
    t = torch.tensor([0.0, 1.5, 412.37, 999.0])
    assert torch.equal(model.time_features(t), sinusoid(t, TINY.time_channels))
    model.half()
    assert torch.equal(model.time_features(t), sinusoid(t, TINY.time_channels))


@needs_cpu_fp16
def test_half_precision_against_the_reference(tiny_connector_file):
    """fp16 TSC vs the fp64 reference on the same fp16-rounded weights: only fp16 arithmetic error remains."""
    half = load_connector(tiny_connector_file, dtype=torch.float16)
    x = features(3, 9).half()
    t = torch.tensor([999.0, 500.25, 3.0])
    out = half(x, t).double()
    ref = reference_tsc(state_of(half), x, t, TINY.heads)
    assert ((out - ref).norm() / ref.norm()) < 1e-2


def test_odd_time_channels(tmp_path):
    cfg = ConnectorConfig(time_channels=15, time_embed_dim=16, width=16, layers=1, heads=2, num_latents=4,
                          input_dim=12)
    model = init_random(Connector(cfg), torch.Generator().manual_seed(5), std=0.3)
    x = features(2, 5, width=12)
    t = torch.tensor([17.0, 930.5])
    torch.testing.assert_close(model(x, t).double(), reference_tsc(state_of(model), x, t, 2), **TOL)


def test_dtype_move_and_half_precision(tiny_connector_file):
    """Low precision computes what fp32 computes with the same (rounded) weights, to within its resolution."""
    x = features(2, 5)
    for dtype, tolerance in ((torch.bfloat16, 0.03), (torch.float16, 0.005)):  # bf16 keeps 8 bits, fp16 11
        if dtype == torch.float16 and not CPU_FP16:
            continue  # torch 2.1 (A1111 1.10's): no fp16 matrix products on the CPU; the newer stacks run it
        low = load_connector(tiny_connector_file, dtype=dtype)
        out = low(x, 640.0)  # float32 features are cast to the module's dtype
        assert out.dtype == dtype
        same_weights = load_connector(tiny_connector_file, dtype=dtype).float()
        ref = same_weights(x.to(dtype).float(), 640.0)
        assert ((out.float() - ref).norm() / ref.norm()) < tolerance
    model = load_connector(tiny_connector_file).to(torch.float64)
    assert model(x.double(), 640.0).dtype == torch.float64


# -- emphasis: per-token attention weights -------------------------------------------------------------------------


def emphasis_weights(batch, tokens, seed=7):
    """Per-row, per-token weights in [0, 3): some zeros, some above 1, and one row of ones."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(batch, tokens, generator=generator) * 3
    weights[torch.rand(batch, tokens, generator=generator) < 0.2] = 0.0
    weights[0] = 1.0
    return weights


def lengths_mask(lengths, tokens):
    return torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]


def test_literal_reference_attention_is_torch_multihead_attention(tiny_connector_file):
    """The formula-written attention of the reference, with weights of 1, is torch's nn.MultiheadAttention."""
    model = load_connector(tiny_connector_file)
    x, t = features(3, 6), torch.tensor([5.0, 500.0, 995.0])
    literal = reference_tsc(state_of(model), x, t, TINY.heads, weights=torch.ones(3, 6))
    torch.testing.assert_close(literal, reference_tsc(state_of(model), x, t, TINY.heads), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["fixed", "flexible"])
def test_weights_match_the_literal_reference(tiny_connector_file, mode):
    """softmax(logits + log w) in fp64, per row and per token, against the fused fp32 attention."""
    model = load_connector(tiny_connector_file)
    lengths = [9, 4, 7, 1, 9]
    x = features(len(lengths), 9, seed=3)
    weights = emphasis_weights(len(lengths), 9)
    t = torch.tensor([999.0, 0.0, 412.37, 250.5, 3.0])
    mask = lengths_mask(lengths, 9) if mode == "flexible" else None  # fixed: every position attended, padding too
    if mask is not None:
        x = x.masked_fill(~mask[..., None], 123.0)
    out = model(x, t, mask, weights)
    ref = reference_tsc(state_of(model), x, t, TINY.heads, weights=weights, mask=mask)
    torch.testing.assert_close(out.double(), ref, **TOL)
    assert not torch.allclose(out, model(x, t, mask), atol=1e-3)  # the weights do change the rows


def test_weighted_rows_batched_equal_each_row_alone(tiny_connector_file):
    """Rows with different weights in one pass: each row is the reference on that row alone, unpadded."""
    model = load_connector(tiny_connector_file)
    lengths = [3, 8, 5]
    x, weights = features(3, 8, seed=4), emphasis_weights(3, 8, seed=5)
    weights[1, 2] = 4.5
    t = torch.tensor([10.0, 600.0, 980.0])
    out = model(x, t, lengths_mask(lengths, 8), weights)
    state = state_of(model)
    for row, n in enumerate(lengths):
        alone = reference_tsc(state, x[row : row + 1, :n], t[row : row + 1], TINY.heads,
                              weights=weights[row : row + 1, :n])
        torch.testing.assert_close(out[row : row + 1].double(), alone, **TOL)


def _sdpa_masks(monkeypatch):
    """The ``attn_mask`` of every attention call the connector makes."""
    import ella_ext.connector as connector_module

    seen = []
    original = connector_module.F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return original(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(connector_module.F, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("masked", [False, True])
def test_all_ones_weights_are_no_weights(tiny_connector_file, monkeypatch, masked):
    """Bit-identical output, and the attention gets exactly the mask it gets without weights (no bias, no kernel)."""
    model = load_connector(tiny_connector_file)
    x, t = features(3, 7), torch.tensor([1.0, 500.0, 999.0])
    mask = lengths_mask([7, 2, 5], 7) if masked else None
    seen = _sdpa_masks(monkeypatch)
    plain = model(x, t, mask)
    plain_masks = list(seen)
    for ones in (torch.ones(3, 7), torch.ones(3, 7, dtype=torch.float64), torch.ones(3, 7, dtype=torch.float16)):
        seen.clear()
        assert torch.equal(model(x, t, mask, ones), plain)
        assert len(seen) == len(plain_masks) == TINY.layers
        for got, expected in zip(seen, plain_masks):
            assert (got is None and expected is None) or (got.dtype == torch.bool and torch.equal(got, expected))


def test_zero_weight_is_masking(tiny_connector_file):
    model = load_connector(tiny_connector_file)
    x, t = features(2, 6, seed=8), torch.tensor([300.0, 700.0])
    weights = emphasis_weights(2, 6, seed=9).clamp(min=0.5)
    mask = lengths_mask([6, 5], 6)
    zeroed = weights.clone()
    zeroed[0, 2] = zeroed[1, 4] = 0.0
    masked = mask.clone()
    masked[0, 2] = masked[1, 4] = False
    removed = model(x, t, mask, zeroed)
    # torch.equal: a zero weight and a masked position are the same -inf in the one additive bias
    assert torch.equal(removed, model(x, t, masked, weights))
    # the same as the boolean mask of the unweighted path, up to rounding (a float bias vs a boolean mask kernel)
    ones_elsewhere = torch.where(zeroed == 0, zeroed, torch.ones_like(zeroed))
    torch.testing.assert_close(model(x, t, mask, ones_elsewhere), model(x, t, masked), **TOL)
    # and the same as the token not being there at all
    state = state_of(model)
    for row, keep in enumerate((torch.tensor([0, 1, 3, 4, 5]), torch.tensor([0, 1, 2, 3]))):  # row 1: 5 real tokens
        short = reference_tsc(state, x[row : row + 1, keep], t[row : row + 1], TINY.heads,
                              weights=weights[row : row + 1, keep])
        torch.testing.assert_close(removed[row : row + 1].double(), short, **TOL)


def test_every_text_weight_zero_leaves_the_latents(tiny_connector_file):
    """Weights of 0 on every text token: no NaN, and the text cannot matter any more."""
    model = load_connector(tiny_connector_file)
    zeros = torch.zeros(1, 4)
    first = model(features(1, 4, seed=1), 100.0, None, zeros)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, model(features(1, 4, seed=2), 100.0, None, zeros), atol=0, rtol=0)


def test_bad_weights(tiny_connector_file):
    model = load_connector(tiny_connector_file)
    x = torch.zeros(2, 3, 20)
    with pytest.raises(InputError, match=r"weights must be \[batch, tokens\] = \[2, 3\]"):
        model(x, 1.0, None, torch.ones(2, 4))
    with pytest.raises(InputError, match="weights must be"):
        model(x, 1.0, None, [[1.0] * 3] * 2)
    for bad in (-0.5, float("nan"), float("inf")):
        weights = torch.ones(2, 3)
        weights[1, 1] = bad
        with pytest.raises(InputError, match="finite and at least 0"):
            model(x, 1.0, None, weights)


@needs_cpu_fp16
def test_half_precision_weights_against_the_reference(tiny_connector_file):
    half = load_connector(tiny_connector_file, dtype=torch.float16)
    x, weights = features(3, 9).half(), emphasis_weights(3, 9)
    mask = lengths_mask([9, 6, 2], 9)
    t = torch.tensor([999.0, 500.25, 3.0])
    out = half(x, t, mask, weights).double()
    ref = reference_tsc(state_of(half), x, t, TINY.heads, weights=weights, mask=mask)
    assert ((out - ref).norm() / ref.norm()) < 1e-2
