"""Dense storage forms: one registry, stated error bounds, clear errors, device twins bit-equal to numpy."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from kdcache.storage.dense_forms import DENSE_FORMS, float32_to_bfloat16_bits, get_dense_form
from kdcache.storage.schema import ATTENTION_FORMS, HIDDEN_FORMS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_registry_holds_every_form_with_its_element_type():
    assert {n: str(f.element_type) for n, f in DENSE_FORMS.items()} == {
        "float16": "halffloat", "bfloat16": "uint16", "int8": "int8", "uint8": "uint8"}
    assert HIDDEN_FORMS == ("float16", "bfloat16", "int8") and ATTENTION_FORMS == ("float16", "bfloat16", "uint8")
    assert [n for n, f in DENSE_FORMS.items() if f.scaled] == ["int8"]
    x = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    for form in DENSE_FORMS.values():
        codes, _ = form.encode(x)
        assert form.is_stored(codes) and not form.is_stored(x)


def test_bfloat16_bits_match_torch():
    rng = np.random.default_rng(6)
    x = np.concatenate([
        rng.standard_normal(100_000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 100_000),
        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-40, 3.4e38, -3.4e38], np.float32),
        # exact halfway cases: ties must go to even
        (np.array([0x3F808000, 0x3F818000, 0x3F80C000], np.uint32)).view(np.float32),
    ])
    want = torch.tensor(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bfloat16_bits(x), want)
    # NaN: torch's bits differ between its scalar and vector paths; ours is 0x7FC0.
    assert float32_to_bfloat16_bits(np.array([np.nan], np.float32))[0] == 0x7FC0
    assert np.isnan(get_dense_form("bfloat16").decode(float32_to_bfloat16_bits(np.array([np.nan], np.float32)))).all()


def test_dense_forms_round_trip_within_stated_error():
    rng = np.random.default_rng(7)
    hidden = (rng.standard_normal((50, 12, 96)) * rng.uniform(0.1, 30, (50, 12, 1))).astype(np.float32)
    hidden[0, 0] = 0  # an all-zero vector must not divide by zero
    absmax = np.abs(hidden).max(-1, keepdims=True)
    for form, bound in [("float16", 2.0**-11 * np.abs(hidden) + 1e-7), ("bfloat16", 2.0**-8 * np.abs(hidden)),
                        ("int8", absmax / 254 * (1 + 1e-6) + 1e-12)]:
        codes, params = get_dense_form(form).encode(hidden)
        assert pa.from_numpy_dtype(codes.dtype) == get_dense_form(form).element_type
        back = get_dense_form(form).decode(codes, params)
        assert back.dtype == np.float32 and back.shape == hidden.shape
        assert (np.abs(back - hidden) <= bound).all(), form
    assert get_dense_form("int8").encode(hidden)[1]["scale"].shape == (50, 12)

    attn = rng.dirichlet(np.full(64, 0.1), size=(40, 64)).astype(np.float32)
    uint8 = get_dense_form("uint8")
    codes, params = uint8.encode(attn)
    back = uint8.decode(codes, params)
    assert codes.dtype == np.uint8 and back.shape == attn.shape
    assert np.abs(back - attn).max() <= 1 / 255 + 1e-6
    assert np.abs(back - attn).mean() < 2e-4
    assert uint8.decode(uint8.encode(np.array([0.0, 1.0], np.float32))[0]).tolist() == [0.0, 1.0]


def test_dense_bad_input():
    with pytest.raises(ValueError, match="form"):
        get_dense_form("int4")
    with pytest.raises(ValueError, match="x"):
        get_dense_form("float16").encode(np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="x"):
        get_dense_form("float16").encode_torch(np.zeros(3, np.float32))
    int8 = get_dense_form("int8")
    codes, params = int8.encode(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="params"):
        int8.decode(codes, {})
    with pytest.raises(ValueError, match="params"):
        int8.decode(codes, {"scale": np.ones(3, np.float32)})



@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # float16 of 7e4 and inf, on purpose
@pytest.mark.parametrize("device", DEVICES)
def test_encode_torch_gives_the_numpy_codes(device):
    rng = np.random.default_rng(10)
    hidden = (rng.standard_normal((40, 12, 96)) * 10.0 ** rng.integers(-6, 6, (40, 12, 1))).astype(np.float32)
    hidden[0, 0] = 0  # an all-zero vector (int8 scale 0)
    hidden[0, 1, :3] = [np.inf, -np.inf, 7e4]  # beyond float16
    attn = rng.dirichlet(np.full(64, 0.1), size=(40, 64)).astype(np.float32)
    cases = [(hidden, f) for f in ("float16", "bfloat16", "int8")] + [(hidden.astype(np.float64), "float16"),
                                                                      (attn, "uint8"), (attn, "float16")]
    for x, form in cases:
        if form == "int8":
            x = np.nan_to_num(x, posinf=1e4, neginf=-1e4)
        want, want_params = get_dense_form(form).encode(x)
        got, got_params = get_dense_form(form).encode_torch(torch.from_numpy(x).to(device))
        np.testing.assert_array_equal(got.cpu().numpy(), want, err_msg=f"{form} {x.dtype}")
        assert got.cpu().numpy().dtype == want.dtype
        assert set(got_params) == set(want_params)
        for k, v in want_params.items():
            np.testing.assert_array_equal(got_params[k].cpu().numpy(), v)
    # bfloat16 NaN is the canonical 0x7FC0 on both sides; teacher outputs in bfloat16 encode the same.
    nan = torch.tensor([np.nan, -np.nan, 1.0], device=device)
    assert get_dense_form("bfloat16").encode_torch(nan)[0].cpu().numpy().tolist()[:2] == [0x7FC0, 0x7FC0]
    bf16 = torch.from_numpy(hidden).to(device).to(torch.bfloat16)
    for form in ("float16", "bfloat16", "int8"):
        src = bf16.nan_to_num(posinf=1e4, neginf=-1e4) if form == "int8" else bf16
        np.testing.assert_array_equal(get_dense_form(form).encode_torch(src)[0].cpu().numpy(),
                                      get_dense_form(form).encode(src.float().cpu().numpy())[0])
