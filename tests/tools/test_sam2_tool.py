"""SAM2Tool on the real sam2 package: SAM2.1 hiera-tiny and a MedSAM2-shaped (512 px) build from the package config,
random weights, on a real demo image. The image is encoded once per tool however many clicks follow."""

from __future__ import annotations

import numpy as np
import pytest

from ibisagent._compat import ensure_torchvision

ensure_torchvision()
torch = pytest.importorskip("torch", reason="the sam2 tool needs torch")
pytest.importorskip("sam2", reason="the sam2 tool needs the sam2 package")

from ibisagent.tools import ToolError, build_tool  # noqa: E402
from ibisagent.tools.sam2_tool import SAM2Tool, resolve_config  # noqa: E402
from ibisagent.types import Click  # noqa: E402

CLICKS = [Click(400.5, 300.2, True), Click(200.0, 700.0, False), Click(450.0, 350.0, True)]


def _demo_image(demo_dir, width: int) -> np.ndarray:
    """A real 1024x1024 demo CT slice, cropped to 1024 x `width` so that x and y scale differently."""
    from PIL import Image

    image = np.asarray(Image.open(demo_dir / "demo" / "04_CT_liver.png").convert("RGB"))
    return np.ascontiguousarray(image[:, :width])


class _Recorder:
    """Counts image-encoder forwards and records the points and multimask flag that reach the SAM heads."""

    def __init__(self, model):
        self.encoder_calls = 0
        self.points: list[torch.Tensor] = []
        self.multimask: list[bool] = []
        model.image_encoder.register_forward_hook(self._encoder)
        model.sam_prompt_encoder.register_forward_pre_hook(self._prompt, with_kwargs=True)
        model.sam_mask_decoder.register_forward_pre_hook(self._decoder, with_kwargs=True)

    def _encoder(self, module, args, out):
        self.encoder_calls += 1

    def _prompt(self, module, args, kwargs):
        self.points.append(kwargs["points"][0].clone())

    def _decoder(self, module, args, kwargs):
        self.multimask.append(kwargs["multimask_output"])


@pytest.fixture(scope="module")
def sam2(demo_dir):
    tool = build_tool("sam2")
    rec = _Recorder(tool.model)
    image = _demo_image(demo_dir, 800)
    tool.set_image(image)
    return tool, rec, image


@pytest.fixture(scope="module")
def medsam2(demo_dir):
    tool = build_tool("medsam2")
    rec = _Recorder(tool.model)
    image = _demo_image(demo_dir, 1024)
    tool.set_image(image)
    return tool, rec, image


def test_build_tool_returns_sam2_tools(sam2, medsam2):
    assert isinstance(sam2[0], SAM2Tool) and sam2[0].name == "sam2" and sam2[0].model.image_size == 1024
    assert isinstance(medsam2[0], SAM2Tool) and medsam2[0].name == "medsam2" and medsam2[0].model.image_size == 512
    rope = medsam2[0].model.memory_attention.layers[0].self_attn
    assert rope.freqs_cis.shape[0] == 32 * 32  # MedSAM2's RoPE table for the 32x32 embedding


def test_iterative_predicts_reuse_one_embedding(sam2):
    tool, rec, image = sam2
    out = tool.predict(CLICKS[:1])
    for k in range(2, len(CLICKS) + 1):
        out = tool.predict(CLICKS[:k], out.logits)
        assert out.mask.shape == image.shape[:2] and out.mask.dtype == bool
        assert out.logits.shape == (256, 256) and out.logits.dtype == np.float32
        assert isinstance(out.score, float)
    assert tool.encode_count == 1
    assert rec.encoder_calls == 1


def test_clicks_reach_the_model_as_xy_pixels(sam2):
    tool, rec, image = sam2
    h, w = image.shape[:2]
    tool.predict(CLICKS[:2])
    # SAM2 scales (x, y) pixels of the original image by 1024/W and 1024/H into its input frame.
    expected = torch.tensor([[c.x * 1024 / w, c.y * 1024 / h] for c in CLICKS[:2]])
    torch.testing.assert_close(rec.points[-1][0], expected)


def test_multimask_only_for_a_lone_first_click(sam2):
    tool, rec, _ = sam2
    first = tool.predict(CLICKS[:1])
    assert rec.multimask[-1] is True
    tool.predict(CLICKS[:1], first.logits)
    assert rec.multimask[-1] is False
    tool.predict(CLICKS[:2])
    assert rec.multimask[-1] is False


def test_previous_logits_change_the_prediction(sam2):
    tool, _, _ = sam2
    first = tool.predict(CLICKS[:1])
    with_prev = tool.predict(CLICKS[:2], first.logits)
    without = tool.predict(CLICKS[:2], None)
    assert not np.allclose(with_prev.logits, without.logits)
    again = tool.predict(CLICKS[:2], first.logits)
    np.testing.assert_array_equal(again.logits, with_prev.logits)


def test_wrongly_shaped_previous_logits_are_refused(sam2):
    tool, _, _ = sam2
    with pytest.raises(ToolError, match="prev_logits"):
        tool.predict(CLICKS[:1], np.zeros((128, 128), np.float32))


def test_medsam2_runs_at_512_with_128px_logits(medsam2):
    tool, rec, image = medsam2
    out = tool.predict(CLICKS[:1])
    out = tool.predict(CLICKS[:2], out.logits)
    assert out.mask.shape == image.shape[:2]
    # the low-resolution frame is image_size / 4: 128x128 at 512 px (256x256 only at 1024 px)
    assert out.logits.shape == (128, 128) == tool.empty_logits().shape
    assert tool.encode_count == 1 and rec.encoder_calls == 1


def test_mask_to_logits_fills_the_whole_low_res_frame(sam2, medsam2):
    for tool, _, image in (sam2, medsam2):
        h, w = image.shape[:2]
        mask = np.zeros((h, w), bool)
        mask[:, : w // 2] = True
        logits = tool.mask_to_logits(mask)
        assert logits.shape == tool.low_res_shape and logits.dtype == np.float32
        side = tool.low_res_shape[1]
        assert (logits[:, : side // 2 - 1] > 0).all() and (logits[:, side // 2 + 1 :] < 0).all()
        assert tool.predict(CLICKS[:1], logits).mask.shape == (h, w)


def test_predict_before_set_image_raises():
    tool = SAM2Tool.from_checkpoint(None, medsam2=True)
    with pytest.raises(ToolError, match="before set_image"):
        tool.predict(CLICKS[:1])


def test_random_weights_are_the_same_in_every_build(medsam2):
    """Without a checkpoint the weights come from a fixed seed (runs and worker processes agree), and building
    leaves the caller's random state alone."""
    state = torch.random.get_rng_state()
    again = SAM2Tool.from_checkpoint(None, medsam2=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    first = medsam2[0].model.state_dict()
    assert all(torch.equal(first[k], v) for k, v in again.model.state_dict().items())


def test_checkpoint_round_trip(medsam2, tmp_path):
    tool, _, image = medsam2
    path = tmp_path / "medsam2.pt"
    torch.save({"model": tool.model.state_dict()}, path)  # MedSAM2_latest.pt's layout
    loaded = SAM2Tool.from_checkpoint(str(path), medsam2=True)
    loaded.set_image(image)
    a = tool.predict(CLICKS[:1])
    b = loaded.predict(CLICKS[:1])
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.score == b.score


def test_bad_checkpoints_raise_tool_errors(medsam2, tmp_path):
    with pytest.raises(ToolError, match="does not exist"):
        SAM2Tool.from_checkpoint(str(tmp_path / "missing.pt"))
    sd = {k: v for k, v in medsam2[0].model.state_dict().items() if not k.startswith("sam_mask_decoder.")}
    sd["image_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(1)  # a SAM v1 key
    path = tmp_path / "wrong.pt"
    torch.save(sd, path)
    with pytest.raises(ToolError, match=r"missing keys \['sam_mask_decoder.*--tool sam"):
        SAM2Tool.from_checkpoint(str(path), medsam2=True)


def test_config_names_resolve_inside_the_sam2_package():
    assert resolve_config(None) == "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert resolve_config("sam2.1_hiera_s") == "configs/sam2.1/sam2.1_hiera_s.yaml"
    assert resolve_config("configs/sam2.1/sam2.1_hiera_b+.yaml") == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    with pytest.raises(ToolError, match="sam2.1_hiera_t"):
        resolve_config("sam2.1_hiera_xl")
