"""Stable Diffusion's safety checker (diffusers' ``StableDiffusionSafetyChecker``) in JAX.

The SD 1.x/2.x repositories ship it as ``safety_checker/`` (a CLIP ViT-L/14 vision tower,
``visual_projection``, and fixed concept embeddings with thresholds) plus
``feature_extractor/`` (CLIPImageProcessor settings).  For each image (diffusers'
``forward``, in float32):

* ``image_embeds = visual_projection(pooled vision output)`` of the preprocessed image;
* special-care scores ``round(cos(image, special_j) - special_weight_j + adj, 3)`` for the 3
  special-care concepts in order, where ``adj`` becomes 0.01 once one of them is > 0 (so
  it also raises the later special-care scores, as diffusers' loop does);
* concept scores ``round(cos(image, concept_k) - concept_weight_k + adj, 3)`` for the 17
  concepts, with the final ``adj``;
* the image is flagged (``nsfw_content_detected``) when any concept score is > 0.

Everything is jittable, so the pipeline runs it inside the compiled generation on the
decoded uint8 images: no extra host round trip.  What happens to a flagged image is the
checker's ``action``: ``"black"`` (diffusers: all zeros), ``"blur"`` (downscaled to 16 px
on its longer side and back up: the layout stays, the detail does not) or ``"keep"``
(the image unchanged, only the flag recorded).

Parameters (checkpoint keys, both forms read: ``vision_model.vision_model.*`` as the SD
repositories store them, ``vision_model.*`` as diffusers saves them with transformers 5)::

    vision     the CLIPVisionModel tree (sd_jax.models.clip_vision), with visual_projection
    concept_embeds [17, P], concept_embeds_weights [17]
    special_care_embeds [3, P], special_care_embeds_weights [3]
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models import clip_vision as cv
from sd_jax.models.policy import Policy
from sd_jax.weights.diffusers import read_config, read_state_dict
from sd_jax.weights.safetensors_io import CheckpointError

__all__ = ["SafetyChecker", "ACTIONS", "load", "present", "cosine", "blur", "FlaggedArray", "FlaggedList"]

ACTIONS = ("black", "blur", "keep")
_CONCEPT_KEYS = ("concept_embeds", "concept_embeds_weights", "special_care_embeds", "special_care_embeds_weights")


def cosine(a, b):
    """[B, P] x [K, P] -> [B, K] cosine similarities (torch's ``normalize``: eps 1e-12)."""
    n = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    return n(a) @ n(b).T


def blur(images):
    """A heavy blur: each image downscaled (antialiased) to 16 px on its longer side (a
    quarter of it for images under 64 px) and linearly back up.  [B, H, W, 3] uint8 or float
    -> the same shape and dtype."""
    b, h, w, c = images.shape
    scale = min(16, max(1, max(h, w) // 4)) / max(h, w)
    x = images.astype(jnp.float32)
    small = jax.image.resize(x, (b, max(1, round(h * scale)), max(1, round(w * scale)), c), "linear",
                             antialias=True)
    out = jax.image.resize(small, x.shape, "linear")
    if images.dtype == jnp.uint8:
        return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
    return out.astype(images.dtype)


@dataclasses.dataclass(frozen=True)
class SafetyChecker:
    """The checker's static part (hashable: it is a field of the pipeline's compiled Plan).

    vision: the CLIP vision tower with projection (:class:`~sd_jax.models.clip_vision.CLIPVisionModel`).
    preprocess: the ``feature_extractor/`` settings (:class:`~sd_jax.models.clip_vision.PreprocessConfig`).
    action: what happens to a flagged image: ``"black"``, ``"blur"`` or ``"keep"``.
    """
    vision: cv.CLIPVisionModel
    preprocess: cv.PreprocessConfig = cv.PreprocessConfig()
    action: str = "black"

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"safety policy {self.action!r} is not one of {', '.join(ACTIONS)}")

    def embed(self, params, images):
        """uint8 [B, H, W, 3] -> float32 [B, P] projected image embeddings."""
        pixels = cv.preprocess(images, **self.preprocess.kwargs())
        return self.vision.apply({"params": params["vision"]}, pixels)["image_embeds"].astype(jnp.float32)

    def scores(self, params, images) -> dict:
        """diffusers' scores and flags of uint8 images [B, H, W, 3].

        Returns ``special_scores`` [B, S], ``concept_scores`` [B, C] (float32, rounded to 3
        decimals as diffusers rounds them), ``nsfw`` bool [B]."""
        emb = self.embed(params, images)
        f32 = lambda k: params[k].astype(jnp.float32)  # noqa: E731
        special = cosine(emb, f32("special_care_embeds")) - f32("special_care_embeds_weights")
        concept = cosine(emb, f32("concept_embeds")) - f32("concept_embeds_weights")
        adj = jnp.zeros(emb.shape[:1], jnp.float32)
        cols = []
        for j in range(special.shape[1]):   # diffusers' loop: adj rises after the first hit
            s = jnp.round(special[:, j] + adj, 3)
            adj = jnp.where(s > 0, jnp.float32(0.01), adj)
            cols.append(s)
        special_scores = jnp.stack(cols, axis=1)
        concept_scores = jnp.round(concept + adj[:, None], 3)
        return dict(special_scores=special_scores, concept_scores=concept_scores,
                    nsfw=jnp.any(concept_scores > 0, axis=1))

    def __call__(self, params, images):
        """Check decoded images and apply ``action`` to the flagged ones.

        images: uint8 [B, H, W, 3], or float32 [B, H, W, 3] in [0, 1] (checked after rounding
        to uint8, as diffusers checks the PIL image).  Returns ``(images, nsfw bool [B])``."""
        as_uint8 = images if images.dtype == jnp.uint8 else jnp.round(jnp.clip(images, 0, 1) * 255).astype(jnp.uint8)
        nsfw = self.scores(params, as_uint8)["nsfw"]
        if self.action == "keep":
            return images, nsfw
        replaced = jnp.zeros_like(images) if self.action == "black" else blur(images)
        return jnp.where(nsfw[:, None, None, None], replaced, images), nsfw


# ---- pipeline outputs -------------------------------------------------------------------

class FlaggedArray(np.ndarray):
    """A numpy array of images with diffusers' ``nsfw_content_detected``: a list of bools,
    one per image, or None when no checker ran."""
    nsfw_content_detected = None

    @classmethod
    def of(cls, images: np.ndarray, flags) -> "FlaggedArray":
        out = np.asarray(images).view(cls)
        out.nsfw_content_detected = flags
        return out

    def __array_finalize__(self, obj):
        self.nsfw_content_detected = getattr(obj, "nsfw_content_detected", None)


class FlaggedList(list):
    """A list of PIL images with diffusers' ``nsfw_content_detected`` (see :class:`FlaggedArray`)."""

    def __init__(self, images, flags=None):
        super().__init__(images)
        self.nsfw_content_detected = flags


# ---- loading ----------------------------------------------------------------------------

def present(model_folder: str | os.PathLike) -> bool:
    """Whether a diffusers model folder has a safety checker: a ``safety_checker/`` folder
    that ``model_index.json`` (if any) does not set to ``[null, null]``."""
    folder = os.fspath(model_folder)
    if not os.path.isfile(os.path.join(folder, "safety_checker", "config.json")):
        return False
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                entry = json.load(f).get("safety_checker")
        except (OSError, ValueError):
            return True
        if isinstance(entry, (list, tuple)) and not any(entry):
            return False
    return True


def _rename(key: str) -> str:
    # The SD repositories: vision_model (diffusers' CLIPVisionModel) . vision_model (its tower).
    return key.removeprefix("vision_model.") if key.startswith("vision_model.vision_model.") else key


def load(model_folder: str | os.PathLike, *, policy: Policy | None = None, action: str = "black",
         variant: str | None = None, allow_pickle: bool = False) -> tuple[SafetyChecker, dict]:
    """Read ``model_folder/safety_checker/`` (config.json + weights, as diffusers saves a
    ``StableDiffusionSafetyChecker``) and ``model_folder/feature_extractor/``.

    Returns ``(checker, params)`` (params on the default device).  Raises CheckpointError
    (one line) for a missing feature extractor, weights that do not match the config (the
    projection's width included) or concept embeddings of another width."""
    folder = os.fspath(model_folder)
    sc_dir, fe_dir = os.path.join(folder, "safety_checker"), os.path.join(folder, "feature_extractor")
    if not os.path.isfile(os.path.join(fe_dir, "preprocessor_config.json")):
        raise CheckpointError(f"{folder!r} has a safety_checker/ but no feature_extractor/preprocessor_config.json; "
                              f"add the model's feature_extractor/ or turn the checker off (--no-safety-checker)")
    pre = cv.PreprocessConfig.read(fe_dir)
    config = cv.CLIPVisionConfig.from_dict(read_config(sc_dir))
    state_dict = read_state_dict(sc_dir, variant=variant, allow_pickle=allow_pickle)
    checker, params = from_state_dict(config, state_dict, pre, sc_dir, policy=policy, action=action)
    return checker, jax.device_put(params)


def from_state_dict(config: cv.CLIPVisionConfig, state_dict, preprocess: cv.PreprocessConfig, where: str, *,
                    policy: Policy | None = None, action: str = "black") -> tuple[SafetyChecker, dict]:
    """The checker and its host parameters from a ``StableDiffusionSafetyChecker`` state dict
    (``config``: its vision config with ``projection_dim``; ``where`` names it in errors)."""
    sc_dir = where
    state_dict = {_rename(k): v for k, v in state_dict.items()}
    missing = [k for k in _CONCEPT_KEYS if k not in state_dict]
    if missing:
        raise CheckpointError(f"safety checker in {sc_dir!r} has no {', '.join(missing)}; "
                              f"it is not a StableDiffusionSafetyChecker")
    concepts = {k: np.asarray(state_dict.pop(k), np.float32) for k in _CONCEPT_KEYS}
    if config.projection_dim is None:
        raise CheckpointError(f"safety checker config in {sc_dir!r} gives no projection_dim")
    vision, vparams = cv.params_from_state_dict(config, state_dict, sc_dir, policy or Policy())
    p = vision.config.projection_dim
    for k in ("concept_embeds", "special_care_embeds"):
        e, w = concepts[k], concepts[k + "_weights"]
        if e.ndim != 2 or e.shape[1] != p or w.shape != e.shape[:1]:
            raise CheckpointError(f"safety checker in {sc_dir!r}: {k} has shape {e.shape} and {k}_weights "
                                  f"{w.shape}, but the projection is {p} wide (wants [K, {p}] and [K]); "
                                  f"check that config.json belongs to these weights")
    if preprocess.crop_size != config.image_size:
        raise CheckpointError(f"feature_extractor crop_size {preprocess.crop_size} differs from the safety "
                              f"checker's image_size {config.image_size} in {sc_dir!r}")
    return SafetyChecker(vision, preprocess, action), {"vision": vparams, **concepts}
