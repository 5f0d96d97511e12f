"""Hand-computed checks of the VLA input/output rules (vla_spec §1.4, §1.5, §2, §3.2): the model's
side (ript/vla/processing.py) and LIBERO's (proprio state, gripper rule: ript/envs/libero.py)."""

import math

import numpy as np
import pytest
import torch

from ript.envs.libero import libero_gripper, libero_proprio, quat2axisangle
from ript.vla import processing as P


def test_token_bin_round_trip_by_hand():
    # digitize(-1.0) = 1 -> id 31999; digitize(1.0) = 256 -> id 31744 (the last 256 ids)
    assert P.actions_to_tokens([-1.0, 1.0]).tolist() == [31999, 31744]
    # out-of-range actions clip first
    assert P.actions_to_tokens([-3.0, 7.0]).tolist() == [31999, 31744]
    # 0.0 lies in bin [bins[127], bins[128]) = [-1/255, 1/255) -> digitize 128 -> id 31872
    assert P.actions_to_tokens([0.0]).tolist() == [31872]
    # decoding id 31872: j = 32000 - 31872 - 1 = 127, centre = -1 + (2/255)(127.5) = 0.0
    assert P.tokens_to_actions([31872])[0] == pytest.approx(0.0, abs=1e-12)
    # id 31999 -> j = 0 -> -1 + 1/255; id 31744 -> j = 255 -> clipped to 254 -> 1 - 1/255
    assert P.tokens_to_actions([31999, 31744]) == pytest.approx([-1 + 1 / 255, 1 - 1 / 255])
    # a non-action id (e.g. 100) clips to the extreme bin 254
    assert P.tokens_to_actions([100])[0] == pytest.approx(1 - 1 / 255)
    # round trip of centres is exact
    c = P.BIN_CENTERS
    assert P.tokens_to_actions(P.actions_to_tokens(c)) == pytest.approx(c, abs=1e-12)
    # any action comes back within one bin width (2/255)
    a = np.linspace(-0.99, 0.99, 101)
    assert np.abs(P.tokens_to_actions(P.actions_to_tokens(a)) - a).max() <= 2 / 255 + 1e-12


def test_unnormalize_with_mask_by_hand():
    stats = {"q01": [-2.0, 0.0, 10.0], "q99": [2.0, 1.0, 20.0], "mask": [True, True, False]}
    # dim 0: (0.5 + 1)/2 * 4 - 2 = 1.0; dim 1: (-1 + 1)/2 * 1 + 0 = 0; dim 2 masked: unchanged
    assert P.unnormalize_actions([0.5, -1.0, 0.3], stats).tolist() == pytest.approx([1, 0, 0.3])
    # no mask key: every dimension un-normalised
    out = P.unnormalize_actions([1.0, 1.0, 1.0], {"q01": [0, 0, 0], "q99": [1, 2, 3]})
    assert out.tolist() == pytest.approx([1, 2, 3])
    # OFT's epsilon widens the range by 1e-8
    out = P.unnormalize_actions([1.0], {"q01": [0.0], "q99": [1.0]}, eps=1e-8)
    assert out[0] == pytest.approx(1.0 + 1e-8, abs=1e-15)


def test_quat2axisangle_by_hand():
    # 90° about z: q = (0, 0, sin 45°, cos 45°) -> axis-angle (0, 0, π/2)
    s = math.sqrt(0.5)
    assert quat2axisangle([0, 0, s, s]) == pytest.approx([0, 0, math.pi / 2])
    # 180° about x: q = (1, 0, 0, 0) -> (π, 0, 0)
    assert quat2axisangle([1, 0, 0, 0]) == pytest.approx([math.pi, 0, 0])
    # identity, w = 1 and w = -1 (and w slightly above 1 from float noise): zero vector, no NaN
    for w in (1.0, -1.0, 1.0 + 1e-9):
        out = quat2axisangle([0, 0, 0, w])
        assert np.isfinite(out).all() and out.tolist() == [0, 0, 0]
    # batched
    out = quat2axisangle(np.array([[0, 0, s, s], [1, 0, 0, 0]]))
    assert out.shape == (2, 3) and out[1, 0] == pytest.approx(math.pi)


def test_proprio_state_and_normalisation_by_hand():
    s = math.sqrt(0.5)
    state = libero_proprio([0.1, 0.2, 0.3], [0, 0, s, s], [0.04, -0.04])
    assert state == pytest.approx([0.1, 0.2, 0.3, 0, 0, math.pi / 2, 0.04, -0.04])
    stats = {"q01": [0.0, -1.0], "q99": [1.0, 1.0]}
    # 2 (0.25 - 0) / 1 - 1 = -0.5; 2 (0 + 1) / 2 - 1 = 0; out-of-range clips to ±1
    assert P.normalize_proprio([0.25, 0.0], stats) == pytest.approx([-0.5, 0.0], abs=1e-7)
    assert P.normalize_proprio([5.0, -5.0], stats).tolist() == [1.0, -1.0]


def test_gripper_rule_by_hand():
    a = np.array([[0.1, 0.2, 0.3, 0, 0, 0, 1.0],    # data 1 = open  -> env -1 (open)
                  [0.1, 0.2, 0.3, 0, 0, 0, 0.0],    # data 0 = close -> env +1 (close)
                  [0.1, 0.2, 0.3, 0, 0, 0, 0.5],    # 2·0.5 - 1 = 0 -> sign 0 -> 0
                  [0.1, 0.2, 0.3, 0, 0, 0, 0.7]])   # 0.4 -> +1 -> -1
    out = libero_gripper(a)
    assert out[:, -1].tolist() == [-1.0, 1.0, 0.0, -1.0]
    assert (out[:, :-1] == a[:, :-1]).all()  # the arm dimensions pass through
    assert a[0, -1] == 1.0  # the input is not modified


def test_policy_image_geometry():
    # a 256 render with a bright top-left quadrant: after the 180° rotation it is bottom-right
    frame = np.zeros((256, 256, 3), np.uint8)
    frame[:128, :128] = 255
    img = P.policy_image(frame, crop=False)
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    assert img[200, 200].min() > 240 and img[20, 20].max() < 15
    # the centre crop zooms in by 1/√0.9: the edge (at 112) moves away from the centre
    row = P.center_crop(img)[150, :, 0].astype(int)
    edge_uncropped = int(np.argmax(img[150, :, 0] > 127))
    edge_cropped = int(np.argmax(row > 127))
    expected = 112 + (edge_uncropped - 112) / math.sqrt(0.9)
    assert edge_uncropped == pytest.approx(112, abs=1)
    assert edge_cropped == pytest.approx(expected, abs=1.5)
    # a constant image stays constant through JPEG, resize and crop
    flat = P.policy_image(np.full((256, 256, 3), 77, np.uint8))
    assert np.abs(flat.astype(int) - 77).max() <= 1


def test_pixel_values_stack_dino_then_siglip_per_image():
    a = np.full((224, 224, 3), 255, np.uint8)
    b = np.zeros((224, 224, 3), np.uint8)
    px = P.pixel_values([a, b])
    assert px.shape == (12, 224, 224) and px.dtype == torch.float32
    # image a: DINO (1 - 0.485)/0.229 on channel 0; SigLIP (1 - 0.5)/0.5 = 1 on channels 3-5
    assert px[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-6)
    assert px[3:6].eq(1.0).all()
    # image b: DINO -0.406/0.225 on channel 8; SigLIP -1 on channels 9-11
    assert px[8, 5, 5].item() == pytest.approx(-0.406 / 0.225, rel=1e-6)
    assert px[9:12].eq(-1.0).all()
    # the checkpoint's (bf16-rounded) values are used verbatim when given
    norm = {"means": [(0.484375, 0.455078125, 0.40625), (0.5,) * 3],
            "stds": [(0.228515625, 0.2236328125, 0.224609375), (0.5,) * 3]}
    px = P.pixel_values([a], norm)
    assert px[0, 0, 0].item() == pytest.approx((1 - 0.484375) / 0.228515625, rel=1e-6)


class _Tok:
    """Stands in for a tokenizer's call: BOS + one id per word (the rule under test is ours)."""

    def __init__(self, last):
        self.last = last

    def __call__(self, text):
        class R:
            pass

        r = R()
        r.input_ids = [1] + [100 + i for i, _ in enumerate(text.split())] + self.last
        return r


def test_prompt_text_and_empty_piece_rule():
    assert P.prompt_text("Pick UP the Bowl") == (
        "In: What action should the robot take to pick up the bowl?\nOut:")
    assert P.prompt_ids(_Tok([]), "x")[-1] == 29871          # appended when missing
    ids = P.prompt_ids(_Tok([29871]), "x")
    assert ids[-1] == 29871 and ids[-2] != 29871             # not doubled
