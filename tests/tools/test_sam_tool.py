"""SAMTool on the real segment_anything package: SAM ViT-B with random weights on a real demo image, encoded once
(a ViT-B forward at 1024 px takes 20-45 s on 2 CPU cores), and MedSAM's preprocessing on a 2-block SAM."""

from __future__ import annotations

import numpy as np
import pytest

from ibisagent._compat import ensure_torchvision

ensure_torchvision()
torch = pytest.importorskip("torch", reason="the SAM tool needs torch")
pytest.importorskip("segment_anything", reason="the SAM tool needs the segment_anything package")

from segment_anything.build_sam import _build_sam  # noqa: E402

from ibisagent.tools import ToolError, build_tool  # noqa: E402
from ibisagent.tools.sam_tool import SAMTool  # noqa: E402
from ibisagent.types import Click  # noqa: E402

CLICKS = [Click(150.5, 200.2, True), Click(300.0, 100.0, False), Click(170.0, 220.0, True)]


def _demo_image(demo_dir, step: int, width: int) -> np.ndarray:
    """A real 1024x1024 demo CT slice, subsampled by `step` and cropped to `width` columns (non-square)."""
    from PIL import Image

    image = np.asarray(Image.open(demo_dir / "demo" / "04_CT_liver.png").convert("RGB"))
    return np.ascontiguousarray(image[::step, ::step][:, :width])


def _tiny_sam():
    """The SAM architecture at 1024 px with a 2-block, 64-wide ViT: the same code paths at 1/20 of ViT-B's cost."""
    return _build_sam(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])


class _Recorder:
    """Counts image-encoder forwards (keeping the last input) and records what reaches the SAM heads."""

    def __init__(self, model):
        self.encoder_calls = 0
        self.encoder_input: torch.Tensor | None = None
        self.points: list[torch.Tensor] = []
        self.multimask: list[bool] = []
        model.image_encoder.register_forward_pre_hook(self._encoder)
        model.prompt_encoder.register_forward_pre_hook(self._prompt, with_kwargs=True)
        model.mask_decoder.register_forward_pre_hook(self._decoder, with_kwargs=True)

    def _encoder(self, module, args):
        self.encoder_calls += 1
        self.encoder_input = args[0].clone()

    def _prompt(self, module, args, kwargs):
        self.points.append(kwargs["points"][0].clone())

    def _decoder(self, module, args, kwargs):
        self.multimask.append(kwargs["multimask_output"])


@pytest.fixture(scope="module")
def sam(demo_dir):
    tool = build_tool("sam")
    rec = _Recorder(tool.model)
    image = _demo_image(demo_dir, step=2, width=400)  # 512x400: SAM scales by 2 and pads the width
    tool.set_image(image)
    return tool, rec, image


@pytest.fixture(scope="module")
def medsam(demo_dir):
    tool = SAMTool(_tiny_sam().eval(), medsam=True)
    rec = _Recorder(tool.model)
    image = _demo_image(demo_dir, step=1, width=800)  # 1024x800: MedSAM stretches it to 1024x1024
    tool.set_image(image)
    return tool, rec, image


def test_build_tool_returns_sam_tools(sam):
    assert isinstance(sam[0], SAMTool) and sam[0].name == "sam"
    assert len(sam[0].model.image_encoder.blocks) == 12  # vit_b
    medsam = build_tool("medsam")
    assert isinstance(medsam, SAMTool) and medsam.name == "medsam" and medsam.medsam
    with pytest.raises(ToolError, match="before set_image"):
        medsam.predict(CLICKS[:1])


def test_iterative_predicts_reuse_one_embedding(sam):
    tool, rec, image = sam
    out = tool.predict(CLICKS[:1])
    for k in range(2, len(CLICKS) + 1):
        out = tool.predict(CLICKS[:k], out.logits)
        assert out.mask.shape == image.shape[:2] and out.mask.dtype == bool
        assert out.logits.shape == (256, 256) and out.logits.dtype == np.float32
        assert isinstance(out.score, float)
    assert tool.encode_count == 1
    assert rec.encoder_calls == 1


def test_clicks_reach_the_model_as_xy_pixels(sam):
    tool, rec, _ = sam
    tool.predict(CLICKS[:2])
    # 512x400 -> longest side 1024: both axes scale by 2; x stays the column
    expected = torch.tensor([[c.x * 2, c.y * 2] for c in CLICKS[:2]])
    torch.testing.assert_close(rec.points[-1][0], expected)


def test_multimask_only_for_a_lone_first_click(sam):
    tool, rec, _ = sam
    first = tool.predict(CLICKS[:1])
    assert rec.multimask[-1] is True
    tool.predict(CLICKS[:1], first.logits)
    assert rec.multimask[-1] is False
    tool.predict(CLICKS[:2])
    assert rec.multimask[-1] is False


def test_previous_logits_change_the_prediction(sam):
    tool, _, _ = sam
    first = tool.predict(CLICKS[:1])
    with_prev = tool.predict(CLICKS[:2], first.logits)
    without = tool.predict(CLICKS[:2], None)
    assert not np.allclose(with_prev.logits, without.logits)
    with pytest.raises(ToolError, match="prev_logits"):
        tool.predict(CLICKS[:1], np.zeros((128, 128), np.float32))


def test_mask_to_logits_follows_the_padded_frame(sam, medsam):
    tool, _, image = sam  # 512x400 -> the image fills 256x200 of the 256x256 frame; the padding is outside
    mask = np.ones(image.shape[:2], bool)
    logits = tool.mask_to_logits(mask)
    assert logits.shape == (256, 256) and logits.dtype == np.float32
    assert (logits[:, :200] > 0).all() and (logits[:, 200:] < 0).all()
    assert tool.predict(CLICKS[:1], logits).mask.shape == image.shape[:2]
    tool, _, image = medsam  # MedSAM stretches: the mask covers the whole frame
    assert (tool.mask_to_logits(np.ones(image.shape[:2], bool)) > 0).all()


def test_checkpoint_round_trip(sam, tmp_path):
    tool, _, image = sam
    path = tmp_path / "sam_vit_b.pth"
    torch.save({"model": tool.model.state_dict()}, path)  # MedSAM training checkpoints' layout
    loaded = SAMTool.from_checkpoint(str(path), model_type="vit_b")
    expected = tool.model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # The weights are bitwise equal, so skip a second 20-45 s ViT-B forward: hand the loaded encoder the known
    # embedding and run everything else (preprocessing, prompt encoder, decoder) for real.
    features = tool.predictor.features
    loaded.model.image_encoder.forward = lambda x: features
    loaded.set_image(image)
    for k in (1, 2):
        a, b = tool.predict(CLICKS[:k]), loaded.predict(CLICKS[:k])
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.score == b.score


def test_bad_checkpoints_raise_tool_errors(tmp_path):
    with pytest.raises(ToolError, match="does not exist"):
        SAMTool.from_checkpoint(str(tmp_path / "missing.pth"))
    small = tmp_path / "tiny.pth"
    torch.save(_tiny_sam().state_dict(), small)
    with pytest.raises(ToolError, match="does not match sam vit_b: size mismatch"):
        SAMTool.from_checkpoint(str(small), model_type="vit_b")
    sam2_like = tmp_path / "sam2_like.pth"
    torch.save({"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}}, sam2_like)
    with pytest.raises(ToolError, match="missing keys.*--tool sam2"):
        SAMTool.from_checkpoint(str(sam2_like), medsam=True)
    with pytest.raises(ToolError, match="vit_b, vit_l, vit_h"):
        SAMTool.from_checkpoint(None, model_type="vit_s")


def test_medsam_stretches_and_min_max_normalises(medsam):
    tool, rec, image = medsam
    x = rec.encoder_input
    assert x.shape == (1, 3, 1024, 1024)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # no ImageNet mean/std, no padding
    out = tool.predict(CLICKS[:1])
    assert rec.multimask[-1] is False  # MedSAM was fine-tuned on the single-mask output only
    out = tool.predict(CLICKS[:2], out.logits)
    assert out.mask.shape == image.shape[:2] and out.logits.shape == (256, 256)
    h, w = image.shape[:2]
    expected = torch.tensor([[c.x * 1024 / w, c.y * 1024 / h] for c in CLICKS[:2]])
    torch.testing.assert_close(rec.points[-1][0], expected)
    assert tool.encode_count == 1 and rec.encoder_calls == 1
