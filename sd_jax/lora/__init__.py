"""LoRAs in every format people share, merged into the parameters on the devices.

Formats (:mod:`sd_jax.lora.formats`): kohya / A1111 (``lora_unet_*``, ``lora_te*_``, SDXL in
SGM block names, LoCon, ``dora_scale``), diffusers / PEFT (``lora_A`` / ``lora_B``), diffusers'
attention-processor names (``to_q_lora``), LyCORIS LoHa and LoKr.  Name mapping:
:mod:`sd_jax.lora.targets`; formulas and the jitted merge: :mod:`sd_jax.lora.merge`; reading
and checks: :mod:`sd_jax.lora.loading`; the set of LoRAs of a pipeline: :mod:`sd_jax.lora.state`.

Use it through the pipeline::

    pipe.load_lora("style.safetensors", weight=0.8)
    pipe.load_lora("detail", weight=0.5, lora_dir="loras/")   # by name, as <lora:detail:0.5>
    pipe.set_lora_weights({"style": 0.6})
    pipe.use_loras([("style", 0.7), ("detail", -0.4)], lora_dir="loras/")  # a prompt's <lora:...> tags
    pipe.unload_lora()                                        # the base weights, bit for bit
"""
from sd_jax.lora.loading import Lora, LoraError, parse_spec, read, resolve
from sd_jax.lora.state import LoraSet


def resolve_lora(name: str, lora_dir: str | None = None) -> str:
    """The file of a LoRA given as a path or as a name in ``lora_dir`` (A1111's ``<lora:name:w>``)."""
    return resolve(name, lora_dir)


__all__ = ["Lora", "LoraError", "LoraSet", "parse_spec", "read", "resolve", "resolve_lora"]
