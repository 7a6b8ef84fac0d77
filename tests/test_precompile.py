"""``sd-jax precompile`` fills JAX's persistent compilation cache; a later ``generate`` process
finds its program there instead of compiling it (JAX logs the cache hit)."""
from __future__ import annotations

import os

import pytest
from cli_helpers import ok, run_cli

from sd_jax.cli import build_parser

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "sd-jax-shapes")


def test_precompiled_program_is_found_by_a_second_process(tmp_path):
    cache = tmp_path / "cache"
    p = ok(run_cli("precompile", "--model", SHIPPED, "--shapes", "64x64:2", "--compile-cache", cache))
    assert "64x64:2: 1 program(s) compiled" in p.stdout
    entries = [n for n in os.listdir(cache) if n.startswith("jit__generate")]
    assert len(entries) == 1, os.listdir(cache)
    # JAX_LOG_COMPILES: JAX logs persistent-cache hits (and every compile) as warnings.
    g = ok(run_cli("generate", "a red circle", "--model", SHIPPED, "--size", "64x64", "--steps", 2,
                   "--compile-cache", cache, "-o", tmp_path / "a.png", env={"JAX_LOG_COMPILES": "1"}))
    assert f"Persistent compilation cache hit for 'jit__generate' with key '{entries[0].removesuffix('-cache')}'" in g.stderr
    assert (tmp_path / "a.png").exists()


@pytest.mark.parametrize("shapes,message", [("512x512:20,1024x1024:30", None), ("512x512", None),
                                            ("512x500:20", "multiples of 8"), ("512x512:x", "not a number"),
                                            ("512x512:0", "at least 1")])
def test_shapes_are_parsed_or_refused_in_one_line(shapes, message, capsys):
    parser = build_parser()
    if message is None:
        args = parser.parse_args(["precompile", "--shapes", shapes])
        assert args.shapes == [(512, 512, 20), (1024, 1024, 30)] if "," in shapes else [(512, 512, 30)]
        return
    with pytest.raises(SystemExit):
        parser.parse_args(["precompile", "--shapes", shapes])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sd-jax: error: ") and message in err[0], err
