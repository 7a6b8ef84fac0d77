"""CLIP score: how well each image matches its prompt, by a CLIP model the user has.

``CLIP score = 100 * max(cos(E_image, E_text), 0)`` with the projected embeddings of a
transformers ``CLIPModel`` (OpenAI CLIP ViT-L/14, or an OpenCLIP model converted to the
transformers format), as torchmetrics' ``CLIPScore`` computes it for one image and caption.
Images are preprocessed on the devices as the folder's ``preprocessor_config.json`` says
(:func:`sd_jax.models.clip_vision.preprocess`), prompts tokenized to the text model's 77
tokens (longer prompts are truncated, as torchmetrics does).

From Python on arrays::

    scorer = ClipScorer.load("clip-vit-large-patch14")
    scorer.score(images_uint8_nhwc, ["a red circle", ...])     # float32 [B]

From the command line, for a folder of generated images (prompts from its
``manifest.jsonl``, else each PNG's ``parameters`` metadata)::

    sd-jax score OUT --clip clip-vit-large-patch14 --out scores.csv

The batch is split over every device of the mesh (parameters replicated); a score does not
depend on the device count beyond float rounding.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import sharding
from sd_jax.models import clip as clip_text
from sd_jax.models import clip_vision as cv
from sd_jax.models.policy import Policy
from sd_jax.tokenizer import load_tokenizer, tokenize
from sd_jax.weights.convert import state_dict_to_params
from sd_jax.weights.diffusers import read_config, read_state_dict
from sd_jax.weights.safetensors_io import CheckpointError

__all__ = ["ClipScorer", "clip_scores", "prompts_of_folder", "score_folder", "mean_ci", "write_table"]


def clip_scores(image_embeds, text_embeds):
    """float [B, P] x [B, P] -> float32 [B]: ``100 * max(cos, 0)`` of each pair."""
    a = image_embeds.astype(jnp.float32)
    b = text_embeds.astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))
    return 100 * jnp.maximum(cos, 0.0)


@dataclasses.dataclass(frozen=True)
class _Models:
    text: clip_text.CLIPTextModel
    vision: cv.CLIPVisionModel
    preprocess: cv.PreprocessConfig

    def __call__(self, params, images, ids):
        pixels = cv.preprocess(images, **self.preprocess.kwargs())
        img = self.vision.apply({"params": params["vision"]}, pixels)["image_embeds"]
        txt = self.text.apply({"params": params["text"]}, ids)["text_embeds"]
        return clip_scores(img, txt)


class ClipScorer:
    """A CLIP model (text and vision towers with their projections) that scores image-prompt pairs.

    Attributes: ``models`` (static), ``params`` (replicated over ``mesh``), ``tokenizer``."""

    def __init__(self, models: _Models, params, tokenizer, mesh=None):
        self.models = models
        self.tokenizer = tokenizer
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.params = sharding.replicate(params, self.mesh)
        self._fn = jax.jit(models, out_shardings=sharding.batch_sharded(self.mesh))

    @classmethod
    def load(cls, folder: str | os.PathLike, *, mesh=None, dtype=jnp.float32) -> "ClipScorer":
        """Read a transformers ``CLIPModel`` folder: ``config.json`` (with ``text_config`` and
        ``vision_config``), its weights, a CLIP tokenizer, and ``preprocessor_config.json``
        (default: CLIP's, at the vision model's image size).  Raises CheckpointError (one
        line) for a folder without a vision or text model or without a projection."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise CheckpointError(f"CLIP model folder {folder!r} not found")
        cfg = read_config(folder)
        if cfg.get("model_type") != "clip" or not cfg.get("vision_config") or not cfg.get("text_config"):
            what = cfg.get("model_type") or "no model_type"
            raise CheckpointError(f"{folder!r} is not a full CLIP model ({what}): CLIP scoring needs a transformers "
                                  f"CLIPModel with a text and a vision model (config.json with text_config and "
                                  f"vision_config), e.g. openai/clip-vit-large-patch14")
        vcfg = cv.CLIPVisionConfig.from_dict(cfg)
        tcfg = dataclasses.replace(clip_text.CLIPTextConfig.from_dict(cfg["text_config"]),
                                   projection_dim=vcfg.projection_dim)
        policy = Policy(dtype)
        state_dict = read_state_dict(folder)
        for key, what in (("text_projection.weight", "text"), ("visual_projection.weight", "vision")):
            if key not in state_dict:
                raise CheckpointError(f"CLIP model in {folder!r} has no {key}; CLIP scoring needs the {what} "
                                      f"projection of a full CLIPModel")
        vision_sd = {k: v for k, v in state_dict.items() if k.startswith(("vision_model.", "visual_projection."))}
        text_sd = {k: v for k, v in state_dict.items() if k.startswith(("text_model.", "text_projection."))}
        vision, vparams = cv.params_from_state_dict(vcfg, vision_sd, folder, policy)
        text = clip_text.CLIPTextModel(tcfg, policy=policy)
        tparams = state_dict_to_params(text_sd, text.param_shapes(), what=f"CLIP text model ({folder})",
                                       rename=clip_text._canonical_key, dtype=policy.param_dtype)
        if tuple(state_dict["text_projection.weight"].shape)[0] != vision.config.projection_dim:
            raise CheckpointError(f"CLIP model in {folder!r}: the text and vision projections differ in width")
        pre_path = os.path.join(folder, "preprocessor_config.json")
        pre = (cv.PreprocessConfig.read(folder) if os.path.isfile(pre_path)
               else cv.PreprocessConfig(vcfg.image_size, vcfg.image_size))
        if pre.crop_size != vcfg.image_size:
            raise CheckpointError(f"{pre_path}: crop_size {pre.crop_size} differs from the vision model's image_size "
                                  f"{vcfg.image_size}")
        return cls(_Models(text, vision, pre), {"text": tparams, "vision": vparams}, load_tokenizer(folder), mesh)

    def score(self, images, prompts, batch_size: int = 8) -> np.ndarray:
        """CLIP scores of images and their prompts.

        images: uint8 [B, H, W, 3] (one size; any size, resized as the preprocessor says).
        prompts: B strings.  Returns float32 [B]."""
        images = np.asarray(images)
        prompts = list(prompts)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [batch, height, width, 3], got {images.dtype} {images.shape}")
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
        ids = tokenize(self.tokenizer, prompts) if prompts else np.zeros((0, 77), np.int32)
        size = sharding.padded_size(max(1, min(batch_size, len(images))), self.mesh)
        out = []
        for k in range(0, len(images), size):   # fixed-size calls: one compilation per image size
            n = min(size, len(images) - k)
            batch = sharding.shard_batch({"images": sharding.pad_batch(images[k:k + n], size),
                                          "ids": sharding.pad_batch(ids[k:k + n], size)}, self.mesh)
            with sharding.tracing_for(self.mesh):
                out.append(sharding.to_host(self._fn(self.params, batch["images"], batch["ids"]))[:n])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


# ---- folders of generated images ------------------------------------------------------

def _prompt_from_parameters(text: str) -> str:
    """The prompt of an A1111 ``parameters`` text: the lines before ``Negative prompt:`` or
    the settings line (``Steps: ...``)."""
    lines = text.split("\n")
    if lines and lines[-1].startswith("Steps: "):
        lines = lines[:-1]
    for i, line in enumerate(lines):
        if line.startswith("Negative prompt:"):
            lines = lines[:i]
            break
    return "\n".join(lines)


def prompts_of_folder(folder: str) -> list[tuple[str, str]]:
    """``[(file, prompt)]`` of a folder's PNG images: from ``manifest.jsonl`` when there is one
    (its entries whose files exist), else each PNG's ``parameters`` metadata.  Raises
    ValueError (one line) when a prompt cannot be found."""
    from PIL import Image
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a folder; give the folder of generated images")
    manifest = os.path.join(folder, "manifest.jsonl")
    if os.path.isfile(manifest):
        rows = []
        with open(manifest) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    e = json.loads(line)
                    rows.append((e["file"], e["prompt"]))
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{manifest} line {n} is not a manifest entry with file and prompt") from None
        return [(f, p) for f, p in rows if os.path.isfile(os.path.join(folder, f))]
    pngs = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png") and not f.startswith("."))
    if not pngs:
        raise ValueError(f"{folder!r} has no manifest.jsonl and no PNG images")
    rows = []
    for name in pngs:
        with Image.open(os.path.join(folder, name)) as im:
            text = im.text.get("parameters") if hasattr(im, "text") else None
        if not text:
            raise ValueError(f"{folder!r} has no manifest.jsonl and {name} has no prompt in its PNG metadata "
                             f"('parameters'); score images written by sd-jax (or A1111), or add a manifest.jsonl")
        rows.append((name, _prompt_from_parameters(text)))
    return rows


def mean_ci(scores) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation,
    ``1.96 * sd / sqrt(n)``; NaN for fewer than two scores)."""
    x = np.asarray(scores, np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else math.nan
    return float(x.mean()), float(half)


def summary(rows: list[dict]) -> str:
    """``CLIP score: 31.20 ± 0.40 (95% CI) over 100 image(s)`` for :func:`score_folder`'s rows."""
    mean, half = mean_ci([r["clip_score"] for r in rows])
    ci = f" ± {half:.2f} (95% CI)" if half == half else ""
    return f"CLIP score: {mean:.2f}{ci} over {len(rows)} image(s)"


def score_folder(folder: str, scorer: ClipScorer, batch_size: int = 8) -> list[dict]:
    """``[{"file", "prompt", "clip_score"}]`` for every image of ``folder`` (images grouped by size)."""
    from PIL import Image
    rows = prompts_of_folder(folder)
    images = {}
    for name, _ in rows:
        with Image.open(os.path.join(folder, name)) as im:
            images[name] = np.asarray(im.convert("RGB"))
    by_shape: dict = {}
    for i, (name, _) in enumerate(rows):
        by_shape.setdefault(images[name].shape, []).append(i)
    scores = np.zeros(len(rows), np.float32)
    for idx in by_shape.values():
        scores[idx] = scorer.score(np.stack([images[rows[i][0]] for i in idx]), [rows[i][1] for i in idx],
                                   batch_size)
    return [{"file": f, "prompt": p, "clip_score": round(float(s), 4)} for (f, p), s in zip(rows, scores)]


def write_table(rows: list[dict], path: str) -> None:
    """Write ``rows`` as CSV (``.csv``) or JSON lines (``.jsonl``), atomically."""
    if path.endswith(".csv"):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["file", "prompt", "clip_score"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        text = buf.getvalue()
    elif path.endswith(".jsonl"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        raise ValueError(f"--out {path!r} must end in .csv or .jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
