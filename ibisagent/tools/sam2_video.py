"""SAM 2.1 / MedSAM2 propagation through sam2's video predictor, fed from an in-memory volume.

`init_state` of sam2 1.1.0 reads only a JPEG folder or an mp4; here the slices come straight from a `SliceStack`
(windowed uint8 -> 3 channels -> the model's square size -> ImageNet normalisation, as MedSAM2 feeds its volumes),
one slice at a time as the predictor asks. Its feature cache keeps only the last frame, so repeated propagation
(after every repair) would re-encode every slice: the predictor here keeps the image features of up to
`feature_cache` slices (least recently used out). Anchors are `add_new_mask` conditioning frames
(`add_all_frames_to_correct_as_cond`: a corrected slice conditions later propagation too). One predictor state per
volume, freed by `close`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ibisagent._compat import ensure_torchvision
from ibisagent.tools._weights import load_weights, read_state_dict, seeded_init
from ibisagent.tools.base import ToolError
from ibisagent.tools.sam2_tool import MEDSAM2_OVERRIDES, _suggest, resolve_config
from ibisagent.volume.propagation import SliceOutput, check_direction
from ibisagent.volume.slices import SliceStack

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIDEO_OVERRIDES = ("++model.add_all_frames_to_correct_as_cond=true",)
_OBJ_ID = 1
_PREDICTOR_CLASS = None


class SAM2VideoPropagator:
    """The `ibisagent.volume.Propagator` of SAM 2.1 ("sam2") or MedSAM2 ("medsam2", 512 px).

    predictor:     a built `SAM2VideoPredictor` (see `from_checkpoint`), on its device.
    feature_cache: how many slices' image features to keep (each is a few MB at 512 px).
    Read `encode_count` (image-encoder runs since `set_volume`) and `state` (None when closed).
    """

    def __init__(self, predictor, name: str = "sam2", feature_cache: int = 64):
        if feature_cache < 1:
            raise ToolError(f"feature_cache must be at least 1 slice, got {feature_cache}")
        predictor.__class__ = _predictor_class()  # adds the in-memory state and the per-slice feature cache
        self.predictor = predictor
        self.name = f"{name}-video"
        self.feature_cache = feature_cache
        self.state: dict | None = None

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | None, config: str | None = None, medsam2: bool = False, device: str = "cpu", **kwargs
    ) -> SAM2VideoPropagator:
        """Build the video predictor from a config shipped in `sam2` (as `SAM2Tool.from_checkpoint`) and load weights.
        checkpoint None: random weights, for tests only. kwargs go to the constructor (feature_cache)."""
        ensure_torchvision()
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ToolError(f"SAM2 checkpoint {checkpoint!r} does not exist; pass the path of a .pt file")
        import torch
        from sam2.build_sam import build_sam2_video_predictor

        config_name = resolve_config(config)
        overrides = [*VIDEO_OVERRIDES, *(MEDSAM2_OVERRIDES if medsam2 else ())]
        with seeded_init(torch):
            predictor = build_sam2_video_predictor(
                config_name, ckpt_path=None, device="cpu", hydra_overrides_extra=overrides
            )
        name = "medsam2" if medsam2 else "sam2"
        if checkpoint is None:
            logger.warning(
                "%s video: no checkpoint given, using RANDOM weights (%s); for tests only", name, config_name
            )
        else:
            load_weights(
                predictor,
                read_state_dict(checkpoint, torch, "SAM2"),
                f"{checkpoint!r} does not match {name} built from {config_name}",
                _suggest,
            )
        return cls(predictor.to(device).eval(), name=name, **kwargs)

    @property
    def encode_count(self) -> int:
        return 0 if self.state is None else self.state["encode_count"]

    # -- the Propagator protocol ---------------------------------------------------------------------------------
    def set_volume(self, slices: SliceStack) -> None:
        self.close()
        self.state = self.predictor.init_volume_state(slices, self.feature_cache)

    def add_anchor(self, index: int, mask: np.ndarray) -> np.ndarray:
        """Condition on slice `index` with `mask` (HxW bool); returns the mask the model now holds there."""
        import torch

        state = self._state()
        with torch.inference_mode():
            _, _, masks = self.predictor.add_new_mask(state, int(index), _OBJ_ID, np.asarray(mask, bool))
        return (masks[0, 0] > 0).cpu().numpy()

    def remove_anchor(self, index: int) -> None:
        state = self._state()
        if _OBJ_ID in state["obj_id_to_idx"]:
            self.predictor.clear_all_prompts_in_frame(state, int(index), _OBJ_ID, need_output=False)

    def propagate(self, start: int, direction: int, stop: int) -> Iterator[SliceOutput]:
        import torch

        state = self._state()
        check_direction(start, direction, stop)
        outputs = state["output_dict_per_obj"]
        with torch.inference_mode():
            frames = self.predictor.propagate_in_video(
                state, start_frame_idx=int(start), max_frame_num_to_track=abs(stop - start), reverse=direction < 0
            )
            for frame_idx, _, masks in frames:
                if frame_idx == start:
                    continue
                out = outputs[0]["cond_frame_outputs"].get(frame_idx) or outputs[0]["non_cond_frame_outputs"][frame_idx]
                score = float(torch.sigmoid(out["object_score_logits"].float()).flatten()[0])
                yield SliceOutput(int(frame_idx), (masks[0, 0] > 0).cpu().numpy(), score)

    def close(self) -> None:
        """Free the predictor state and the cached features of this volume."""
        if self.state is not None:
            self.predictor.reset_state(self.state)
            self.state["volume_features"].clear()
            self.state["cached_features"].clear()
            self.state = None

    def _state(self) -> dict:
        if self.state is None:
            raise ToolError(f"{self.name}: set_volume() first (the propagator holds no volume)")
        return self.state


class _Frames:
    """The predictor's `images`: slice i as a 3xSxS float tensor (windowed uint8 -> RGB -> S px -> ImageNet
    normalisation), made when asked for; no JPEG round trip, no whole-volume tensor."""

    def __init__(self, slices: SliceStack, size: int, device):
        import torch

        self.slices, self.size, self.device = slices, size, device
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int):
        import torch

        rgb = torch.from_numpy(self.slices.image(int(index))).permute(2, 0, 1).float()[None] / 255.0
        rgb = torch.nn.functional.interpolate(rgb, size=(self.size, self.size), mode="bilinear", antialias=True)
        return ((rgb[0] - self.mean) / self.std).to(self.device)


def _predictor_class():
    """sam2's video predictor with an in-memory volume state and a per-slice feature cache (made on first use, so
    that this module imports without sam2)."""
    global _PREDICTOR_CLASS
    if _PREDICTOR_CLASS is not None:
        return _PREDICTOR_CLASS
    import torch
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    class VolumeVideoPredictor(SAM2VideoPredictor):
        @torch.inference_mode()
        def init_volume_state(self, slices: SliceStack, feature_cache: int) -> dict:
            """`init_state`'s dict for an in-memory volume (the same keys, frames read lazily)."""
            device = self.device
            height, width = slices.shape
            state = {
                "images": _Frames(slices, self.image_size, device),
                "num_frames": len(slices),
                "offload_video_to_cpu": False,
                "offload_state_to_cpu": False,
                "video_height": height,
                "video_width": width,
                "device": device,
                "storage_device": device,
                "point_inputs_per_obj": {},
                "mask_inputs_per_obj": {},
                "cached_features": {},
                "constants": {},
                "obj_id_to_idx": OrderedDict(),
                "obj_idx_to_id": OrderedDict(),
                "obj_ids": [],
                "output_dict_per_obj": {},
                "temp_output_dict_per_obj": {},
                "frames_tracked_per_obj": {},
                "volume_features": OrderedDict(),
                "feature_cache": feature_cache,
                "encode_count": 0,
            }
            return state

        def _get_image_feature(self, inference_state, frame_idx, batch_size):
            lru = inference_state.get("volume_features")
            if lru is None:  # a state from sam2's own init_state
                return super()._get_image_feature(inference_state, frame_idx, batch_size)
            if frame_idx in lru:
                lru.move_to_end(frame_idx)
                inference_state["cached_features"] = {frame_idx: lru[frame_idx]}
            elif frame_idx not in inference_state["cached_features"]:
                inference_state["encode_count"] += 1
            features = super()._get_image_feature(inference_state, frame_idx, batch_size)
            lru[frame_idx] = inference_state["cached_features"][frame_idx]
            while len(lru) > inference_state["feature_cache"]:
                lru.popitem(last=False)
            return features

    _PREDICTOR_CLASS = VolumeVideoPredictor
    return VolumeVideoPredictor
