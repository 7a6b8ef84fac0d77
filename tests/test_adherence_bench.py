"""The position and size readings benchmarks/bench_adherence.py relies on, on rendered dataset images."""
from __future__ import annotations

import importlib.util
import itertools
import os
import sys

import numpy as np
import pytest

from sd_jax.data import evaluator, shapes

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
# Shape area / h^2 for the half extent h the dataset draws with (shapes._draw).
AREA = {"circle": np.pi, "square": 1.8**2, "triangle": 1.8}


def _load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ on sys.path while it loads: the scripts
    import each other)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, BENCHMARKS)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(BENCHMARKS)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load_benchmark("bench_adherence")


def _render(obj: dict, background: str, seed: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The dataset's image of one object, and its (jittered) centre x, y and half extent h."""
    labels = {"objects": [obj], "background": background}
    geometry = shapes._geometry(labels, np.random.default_rng(seed))[0]
    return shapes._draw(labels, np.random.default_rng(seed), 64), geometry


def test_evaluator_position_size_and_area_on_every_layout():
    """Every shape x size x position: the evaluator's position and size labels are the drawn
    ones, its centre is within 1/50 of the side of the drawn centre, and its area (a fraction of
    the image) is within 10% of the drawn shape's analytic area (measured: +0% to +7%)."""
    combos = itertools.product(shapes.SHAPES, shapes.SIZES, shapes.POSITIONS)
    for i, (shape, size, position) in enumerate(combos):
        obj = {"color": "red", "shape": shape, "size": size, "position": position}
        image, (cx, cy, h) = _render(obj, "blue", i)
        found = evaluator.evaluate(image)
        assert (found["position"], found["size"]) == (position, size), (obj, found["position"], found["size"])
        got = found["objects"][0]
        assert np.allclose(got["center"], (cx, cy), atol=0.02), (obj, got["center"], (cx, cy))
        assert got["area"] == pytest.approx(AREA[shape] * h * h, rel=0.1), obj


def test_bench_prompts_mix_in_size_and_position_words(bench):
    rng = np.random.default_rng(0)
    combos = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
    prompts = bench.prompts_for(combos, 2, rng, size_share=0.5, position_share=0.5)
    parsed = [shapes.parse_prompt(p) for p in prompts]
    assert [(p["color"], p["shape"]) for p in parsed] == [c for c in combos for _ in range(2)]
    assert all(p["background"] not in (None, p["color"]) for p in parsed)
    sizes = [p["size"] for p in parsed if p["size"]]
    positions = {p["position"] for p in parsed if p["position"]}
    assert 0.3 < len(sizes) / len(prompts) < 0.7 and abs(sizes.count("small") - sizes.count("large")) <= 1
    assert positions == set(shapes.POSITIONS)
    for share in (0.0, 1.0):
        parsed = [shapes.parse_prompt(p) for p in bench.prompts_for(combos, 1, rng, share, share)]
        assert all((p["size"] is not None, p["position"] is not None) == (share == 1.0,) * 2 for p in parsed)


def test_bench_summary_scores_rendered_prompts(bench):
    """Images drawn as the prompts ask score 100% on all five, with every "large" shape larger
    than every "small" one; the same images under prompts with small and large swapped score 0%
    on size and large>small 0."""
    rng = np.random.default_rng(3)
    prompts = bench.prompts_for([("green", "triangle"), ("white", "circle"), ("black", "square")], 6, rng,
                                size_share=0.7, position_share=0.7)
    images = []
    for i, p in enumerate(prompts):
        want = shapes.parse_prompt(p)
        obj = {"color": want["color"], "shape": want["shape"], "size": want["size"] or "small",
               "position": want["position"] or "center"}
        images.append(_render(obj, want["background"], i)[0])
    r = bench.summarise(prompts, np.stack(images))
    assert r["n"] == len(prompts) and r["n_size"] >= 4 and r["n_position"] >= 4
    assert all(r[k] == 1.0 for k in ("color", "shape", "background", "position", "size", "large>small")), r
    assert r["area_large"] > 2 * r["area_small"] > 0
    assert r["shape_confusion"] == {k: {k: 6} for k in ("triangle", "circle", "square")}, r["shape_confusion"]
    assert bench._misread(r).endswith("none")
    wrong = dict(r, shape_confusion={"square": {"circle": 14, "square": 4}, "circle": {"circle": 18}})
    assert bench._misread(wrong) == "  shapes misread: square->circle 14/18"
    swapped = [p.replace("small", "LARGE").replace("large", "small").replace("LARGE", "large") for p in prompts]
    s = bench.summarise(swapped, np.stack(images))
    assert s["size"] == 0.0 and s["large>small"] == 0.0 and s["position"] == 1.0, s
    assert (s["area_small"], s["area_large"]) == (r["area_large"], r["area_small"])


def test_scheduler_sweep_folder_makes_diffusers_use_the_named_scheduler(tmp_path):
    """benchmarks/diffusers_schedulers.py compares schedulers by giving diffusers a copy of the
    model folder that differs only in its scheduler: the class must be the one named (diffusers
    takes it from model_index.json, not from the scheduler's config) and the override must
    reach the scheduler's config, with the weights the same files."""
    from diffusers import StableDiffusionPipeline as TorchPipeline

    from sd_jax.cli import default_model
    sweep = _load_benchmark("diffusers_schedulers")
    model = default_model()
    for over, cls in (({"_class_name": "EulerAncestralDiscreteScheduler"}, "EulerAncestralDiscreteScheduler"),
                      ({"algorithm_type": "sde-dpmsolver++"}, "DPMSolverMultistepScheduler")):
        folder = sweep.folder_with_scheduler(model, over, str(tmp_path / cls / over.get("algorithm_type", "x")))
        ref = TorchPipeline.from_pretrained(folder)
        assert type(ref.scheduler).__name__ == cls
        for k, v in over.items():
            if k != "_class_name":
                assert ref.scheduler.config[k] == v, k
        assert os.path.realpath(os.path.join(folder, "unet")) == os.path.realpath(os.path.join(model, "unet"))
