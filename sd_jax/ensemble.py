"""SDXL base + refiner as one compiled generation (diffusers' "ensemble of experts").

The base denoises the high-noise part of the schedule and stops at ``switch``
(``denoising_end``); the refiner continues from the base's latents, not decoded and not
re-noised, from the same point (``denoising_start``), and decodes with its own VAE.  Both
halves run inside one ``jax.jit``, so the latents never leave the devices and the pair
compiles once per static plan (size, steps, sampler, guidance).  diffusers' equivalent::

    latents = base(prompt, denoising_end=0.8, output_type="latent").images
    image = refiner(prompt, image=latents, denoising_start=0.8).images

``SDXLEnsemble`` speaks the pipeline protocol the :class:`~sd_jax.request.Dispatcher` uses
(``resolve``, ``dispatch``, ``compile``, ``compiled_sizes``, ``mesh``), so the Python API, the
CLI and batch jobs run it like a pipeline.  The refiner reads each request's ``prompt`` and
``negative_prompt`` (with its one tokenizer, as diffusers), its aesthetic scores and
micro-conditioning; the sampler, steps, seeds and guidance are the base's.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import numpy as np

from sd_jax import families, memory, sharding
from sd_jax.pipeline import OUTPUTS, StableDiffusionPipeline, _generate
from sd_jax.request import Dispatcher, GenerationRequest, RequestError

# the refiner's init image is the base's latents, handed over inside the compiled function
_BASE_LATENTS = "<the base model's latents>"


@dataclasses.dataclass(frozen=True)
class EnsemblePlan:
    """The static plans of the two halves (base: ``output="latent"``, ``end`` at the switch;
    refiner: img2img from the latents, ``start`` at the switch)."""
    base: Any
    refiner: Any


def _ensemble(base_models, base_encoding, refiner_models, refiner_encoding, plan: EnsemblePlan, params, batch):
    """params / batch: ``{"base": ..., "refiner": ...}`` (see :func:`sd_jax.pipeline._generate`)."""
    latents = _generate(base_models, base_encoding, plan.base, params["base"], batch["base"])
    return _generate(refiner_models, refiner_encoding, plan.refiner, params["refiner"],
                     {**batch["refiner"], "image_latents": latents})


def check_pair(base: StableDiffusionPipeline, refiner: StableDiffusionPipeline, switch: float) -> None:
    """A ValueError (one line) unless ``refiner`` can continue ``base``'s latents at ``switch``."""
    if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0.0 < switch < 1.0:
        raise RequestError(f"the refiner switch must be in (0, 1) (the fraction of the schedule the base "
                           f"denoises), got {switch!r}")
    if base.family is not families.SDXL:
        raise RequestError(f"a refiner continues an SDXL base model, but the base is {base.family.description}")
    if not refiner.options.get("requires_aesthetics_score") and refiner.family is not families.SDXL:
        raise RequestError(f"the refiner must be an SDXL model (an SDXL refiner or base), "
                           f"got {refiner.family.description}")
    if refiner.models.unet.config.in_channels != refiner.latent_channels:
        raise RequestError("the refiner is an inpainting model; give an SDXL refiner")
    if (base.latent_channels, base.models.vae_scale) != (refiner.latent_channels, refiner.models.vae_scale):
        raise RequestError("the refiner's VAE latents differ from the base's; they cannot be handed over")
    if base.mesh.devices.shape != refiner.mesh.devices.shape or list(base.mesh.devices.flat) != \
            list(refiner.mesh.devices.flat):
        raise RequestError("the base and the refiner must be loaded on the same devices (mesh)")


class SDXLEnsemble:
    """SDXL base -> refiner at ``switch`` (0.8: the base takes the first 80 % of the noise
    schedule), compiled as one program per static plan."""

    def __init__(self, base: StableDiffusionPipeline, refiner: StableDiffusionPipeline, switch: float = 0.8):
        check_pair(base, refiner, switch)
        self.base, self.refiner, self.switch = base, refiner, float(switch)
        self.mesh = base.mesh
        self._compiled: dict = {}
        self.compilations = 0

    # ------------------------------------------------------------------ the pipeline protocol
    def _refiner_request(self, r: GenerationRequest) -> GenerationRequest:
        return r.replace(image=_BASE_LATENTS, mask=None, latents=None, denoising_end=None,
                         denoising_start=self.switch)

    def resolve(self, request: GenerationRequest, *, output: str = "uint8", loop: str = "scan"):
        if output not in OUTPUTS:
            raise RequestError(f"output must be one of {OUTPUTS}, got {output!r}")
        if request.image is not None or request.denoising_start is not None or request.denoising_end is not None:
            raise RequestError("the base + refiner ensemble is text-to-image: no image, mask, "
                               "denoising_start or denoising_end (the switch sets them)")
        r, base_plan = self.base.resolve(request.replace(denoising_end=self.switch), output="latent", loop=loop)
        _, ref_plan = self.refiner.resolve(self._refiner_request(r), output=output, loop=loop)
        return r, EnsemblePlan(base_plan, dataclasses.replace(ref_plan, image_latents=True))

    def _inputs(self, plan: EnsemblePlan, requests: Sequence[GenerationRequest]) -> dict:
        return {"base": self.base._inputs(plan.base, requests),
                "refiner": self.refiner._inputs(plan.refiner, [self._refiner_request(r) for r in requests])}

    def _executable(self, plan: EnsemblePlan, batch):
        shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(
            (f"{half}/{k}", v) for half in batch for k, v in batch[half].items()))
        key = (plan, shapes)
        fn = self._compiled.get(key)
        if fn is None:
            f = functools.partial(_ensemble, self.base.models, self.base.family.prompt, self.refiner.models,
                                  self.refiner.family.prompt, plan)
            if plan.base.loop == "debug":
                fn = f
            else:
                size, (h, w) = batch["base"]["seeds"].shape[0], plan.base.latent_shape[:2]
                for pipe in (self.base, self.refiner):
                    memory.check_generation(pipe, size, h * pipe.models.vae_scale, w * pipe.models.vae_scale)
                with sharding.tracing_for(self.mesh):
                    fn = jax.jit(f, out_shardings=sharding.batch_sharded(self.mesh)).lower(self.params, batch).compile()
                self.compilations += 1
            self._compiled[key] = fn
        return fn

    def compiled_sizes(self, plan: EnsemblePlan) -> set[int]:
        return {dict((k, s) for k, s, _ in key[1])["base/seeds"][0] for key in self._compiled if key[0] == plan}

    def dispatch(self, plan: EnsemblePlan, requests: Sequence[GenerationRequest], size: int | None = None):
        size = sharding.padded_size(max(size or 0, len(requests)), self.mesh)
        batch = sharding.shard_batch(jax.tree.map(lambda v: sharding.pad_batch(v, size),
                                                  self._inputs(plan, requests)), self.mesh)
        return self._executable(plan, batch)(self.params, batch)

    def compile(self, plan: EnsemblePlan, request: GenerationRequest, size: int) -> None:
        size = sharding.padded_size(size, self.mesh)
        spec = lambda v: jax.ShapeDtypeStruct((size,) + v.shape[1:], v.dtype, sharding=sharding.batch_sharded(self.mesh))
        self._executable(plan, jax.tree.map(spec, self._inputs(plan, [request])))

    # ------------------------------------------------------------------ generation
    def __call__(self, prompt, negative_prompt=None, *, output_type: str = "pil", batch_size: int | None = None,
                 loop: str = "scan", **kwargs):
        """Generate images: the arguments of :meth:`StableDiffusionPipeline.__call__` (text-to-image)."""
        output = {"pil": "uint8", "np": "float32", "uint8": "uint8", "latent": "latent"}.get(output_type)
        if output is None:
            raise RequestError(f"output_type must be 'pil', 'np', 'uint8' or 'latent', got {output_type!r}")
        requests = self.base.requests(prompt, negative_prompt, **kwargs)
        images = np.stack(Dispatcher(self, batch_size=batch_size, output=output, loop=loop).generate(requests))
        if output_type != "pil":
            return images
        from PIL import Image
        return [Image.fromarray(im) for im in images]

    @property
    def params(self) -> dict:
        """Both pipelines' current parameters (arguments of the compiled call: LoRAs merged
        into the base later are used without recompiling)."""
        return {"base": self.base.params, "refiner": self.refiner.params}

    @functools.cached_property
    def metadata(self) -> dict:
        """The refiner in PNG metadata: ``refiner`` as A1111 titles it (``NAME [HASH]`` for a
        single file: :func:`sd_jax.infotext.checkpoint_title`; hashed once) and ``refiner_switch``."""
        from sd_jax.infotext import checkpoint_title
        return {"refiner": checkpoint_title(self.refiner.source), "refiner_switch": self.switch}

    # LoRAs apply to the base (the refiner is another network; A1111 does the same)
    @property
    def loras(self):
        return self.base.loras

    def use_loras(self, specs, **kwargs) -> None:
        self.base.use_loras(specs, **kwargs)

    # what the CLI and batch jobs read from a pipeline
    @property
    def family(self):
        return self.base.family

    @property
    def models(self):
        return self.base.models

    @property
    def source(self):
        return self.base.source

    @property
    def scheduler_name(self) -> str:
        return self.base.scheduler_name

    @property
    def default_size(self) -> int:
        return self.base.default_size

    @property
    def latent_channels(self) -> int:
        return self.base.latent_channels

    @property
    def memory_check(self) -> bool:
        return getattr(self.base, "memory_check", True)

    @memory_check.setter
    def memory_check(self, value: bool) -> None:
        self.base.memory_check = self.refiner.memory_check = value
