"""A1111 prompt syntax, long prompts in 75-token chunks, emphasis, textual inversion.

* the parser against the examples of A1111's own ``parse_prompt_attention`` docstring;
* chunking (BREAK, comma backtracking, padding to the same number of chunks);
* a 200-token prompt's embeddings against transformers' ``CLIPTextModel`` (torch) run on each
  chunk of the same tiny random text encoder and concatenated;
* emphasis against an independent numpy computation of A1111's arithmetic;
* textual inversion (diffusers and A1111 files) against diffusers' ``load_textual_inversion``:
  token ids and prompt embeddings.
Measured max |diff| of embeddings on the dev VM: ~1e-6 (float32 both sides); tolerance 1e-5.
"""
import os
import warnings

import numpy as np
import pytest
from safetensors.numpy import save_file

from tiny_models import build_tiny_pipeline

torch = pytest.importorskip("torch")

TOL = 1e-5
WORDS = ["red", "circle", "blue", "square", "on", "a", "green", "triangle"]  # one token each (shapes tokenizer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd_tiny_prompts"))
    ref = build_tiny_pipeline(folder)
    # A fresh LayerNorm (bias 0) gives every token's output a mean of 0, and A1111's emphasis
    # divides by the mean: a random final bias, as a trained encoder has, makes it meaningful.
    with torch.no_grad():
        ref.text_encoder.final_layer_norm.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    ref.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    from sd_jax.pipeline import StableDiffusionPipeline
    return folder, ref, StableDiffusionPipeline.from_pretrained(folder)


def _context(pipe, prompt, syntax="a1111", negative=None):
    """Our conditioning context [1, N * 77, D] (and the plan, and the host batch)."""
    from sd_jax.pipeline import _batch_ids, encode_prompt
    from sd_jax.request import GenerationRequest
    r, plan = pipe.resolve(GenerationRequest(prompt, negative or "", guidance=7.5 if negative else 1.0, steps=2,
                                             prompt_syntax=syntax))
    batch = pipe._inputs(plan, [r])
    enc = pipe.family.prompt
    c = encode_prompt(pipe.models, enc, pipe.params, _batch_ids(enc, batch), None,
                      weights=_batch_ids(enc, batch, what="weights"))
    return np.asarray(c.context), plan, batch


def _torch_chunks(ref, ids):
    """transformers' CLIPTextModel on each 77-token chunk of ids [N * 77], concatenated: [1, N * 77, D]."""
    with torch.no_grad():
        out = [ref.text_encoder(torch.from_numpy(np.asarray(c, np.int64))[None]).last_hidden_state.numpy()
               for c in np.asarray(ids).reshape(-1, 77)]
    return np.concatenate(out, axis=1)


def _chunk(tok, content):
    """[BOS] + content + [EOS] + pad, 77 ids (built here independently of sd_jax.prompts)."""
    ids = [tok.bos_token_id] + list(content) + [tok.eos_token_id]
    return ids + [tok.pad_token_id] * (77 - len(ids))


# ----------------------------------------------------------------------------- the parser
A1111_EXAMPLES = [  # A1111 modules/prompt_parser.py, parse_prompt_attention's docstring
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text,want", A1111_EXAMPLES)
def test_parser_gives_a1111_documented_weights(text, want):
    from sd_jax.prompts import parse_prompt_attention
    assert parse_prompt_attention(text) == want


def test_parser_emphasis_break_escapes_and_lora_tags():
    from sd_jax.prompts import extract_loras, parse_prompt_attention
    assert parse_prompt_attention("a (very beautiful:1.3) [cat]") == \
        [("a ", 1.0), ("very beautiful", 1.3), (" ", 1.0), ("cat", 1 / 1.1)]
    assert parse_prompt_attention("((word))") == [("word", 1.1 * 1.1)]
    assert parse_prompt_attention("[[word]]") == [("word", (1 / 1.1) * (1 / 1.1))]
    assert parse_prompt_attention("(a: 1.5 )") == [("a", 1.5)]
    assert parse_prompt_attention("a) b] \\\\ c") == [("a) b] \\ c", 1.0)]  # unmatched closers, escaped \
    # A1111 splits "a cat BREAK " into "a cat", BREAK, "" (the empty piece adds no token)
    assert parse_prompt_attention("a cat BREAK (a dog)") == [("a cat", 1.0), ("BREAK", -1.0), ("", 1.0),
                                                              ("a dog", 1.1)]
    assert parse_prompt_attention("") == [("", 1.0)]
    text, loras = extract_loras("a cat <lora:ink style:0.8>, (red) <lora:b>")
    assert text == "a cat , (red) " and loras == [("ink style", 0.8), ("b", 1.0)]
    with pytest.raises(ValueError, match="not a number"):
        extract_loras("<lora:x:strong>")


# ----------------------------------------------------------------------------- chunks
def test_chunking_break_commas_and_padding(tiny):
    from sd_jax.prompts import chunk_prompt, prompt_arrays
    _, ref, pipe = tiny
    tok = pipe.tokenizer
    wid = lambda w: tok.convert_tokens_to_ids(w + "</w>")  # noqa: E731
    comma = tok.convert_tokens_to_ids(",</w>")
    ids, w = chunk_prompt(tok, "red circle BREAK blue")
    assert ids.tolist() == [_chunk(tok, [wid("red"), wid("circle")]), _chunk(tok, [wid("blue")])]
    assert (w == 1).all()
    # 70 words, a comma, 10 words: the chunk is full at 75 tokens with the comma 5 back, so the 4
    # words after the comma move to the next chunk (A1111's comma_padding_backtrack = 20)
    words = [WORDS[i % 8] for i in range(80)]
    ids, _ = chunk_prompt(tok, " ".join(words[:70]) + ", " + " ".join(words[70:]))
    assert ids.tolist() == [_chunk(tok, [wid(x) for x in words[:70]] + [comma]),
                            _chunk(tok, [wid(x) for x in words[70:]])]
    # without a comma near the end the chunk is cut at 75 tokens
    ids, _ = chunk_prompt(tok, " ".join(words[:30]) + ", " + " ".join(words[30:]))
    assert ids[0, 1:76].tolist() == [wid(x) for x in words[:30]] + [comma] + [wid(x) for x in words[30:74]]
    # a batch is padded with empty chunks ([BOS, EOS, pad...], weight 1)
    ids, w = prompt_arrays(tok, ["(red) circle", " ".join(words)], 2)
    assert ids.shape == w.shape == (2, 154)
    assert ids[0, 77:].tolist() == _chunk(tok, [])
    assert w[0, :4].tolist() == pytest.approx([1.0, 1.1, 1.0, 1.0]) and (w[0, 4:] == 1).all()


def test_200_token_prompt_equals_concatenated_chunk_encodings(tiny):
    """Each chunk encoded by transformers' CLIPTextModel (torch) and concatenated."""
    _, ref, pipe = tiny
    words = [WORDS[i % 8] for i in range(200)]
    prompt = " ".join(words)
    tok = ref.tokenizer
    content = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(content) == 200
    ids = sum((_chunk(tok, content[k:k + 75]) for k in range(0, 200, 75)), [])
    want = _torch_chunks(ref, ids)
    got, plan, batch = _context(pipe, prompt)
    assert plan.prompt_chunks == 3 and got.shape == (1, 231, 32)
    assert batch["ids"].tolist() == [ids]
    diff = float(np.abs(got - want).max())
    print(f"max |diff| {diff:.2e}")
    assert diff <= TOL
    # the negative prompt is padded to the prompt's chunks with the encoding of ""
    got_neg = _context(pipe, prompt, negative="a green triangle")[2]["neg_ids"]
    assert got_neg.shape == (1, 231) and got_neg[0, 77:154].tolist() == _chunk(tok, [])


def test_emphasis_is_a1111_arithmetic(tiny):
    """(red:1.3) [on] against numpy: z * w, then rescaled to z's mean (per sample and chunk)."""
    import jax.numpy as jnp

    from sd_jax.prompts import emphasis
    rng = np.random.RandomState(0)
    z, w = rng.randn(3, 77, 8).astype(np.float32) + 0.2, rng.uniform(0.5, 1.5, (3, 77)).astype(np.float32)
    zw = z * w[:, :, None]
    want = zw * (z.mean(axis=(1, 2)) / zw.mean(axis=(1, 2)))[:, None, None]
    np.testing.assert_allclose(np.asarray(emphasis(jnp.asarray(z), jnp.asarray(w))), want, rtol=1e-5, atol=1e-6)

    _, ref, pipe = tiny
    tok = ref.tokenizer
    ids = _chunk(tok, tok("a red circle on a blue square", add_special_tokens=False)["input_ids"])
    weights = np.ones(77, np.float32)
    weights[2], weights[4] = 1.3, 1 / 1.1          # "red", "on"
    z = _torch_chunks(ref, ids)[0]
    zw = z * weights[:, None]
    want = zw * (z.mean() / zw.mean())
    got, plan, _ = _context(pipe, "a (red:1.3) circle [on] a blue square")
    assert plan.emphasis and plan.prompt_chunks == 1
    assert float(np.abs(got[0] - want).max()) <= TOL
    assert float(np.abs(got[0] - z).max()) > 1e-3  # the weights did something


def test_plain_mode_truncates_with_a_warning_and_keeps_diffusers_ids(tiny):
    from sd_jax.tokenizer import PromptTruncatedWarning
    _, ref, pipe = tiny
    prompt = " ".join(WORDS[i % 8] for i in range(200))
    with pytest.warns(PromptTruncatedWarning, match="the last 125 were dropped"):
        got, plan, batch = _context(pipe, prompt, "plain")
    assert plan.prompt_chunks == 1 and not plan.emphasis and "weights" not in batch
    want = ref.tokenizer(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert batch["ids"].tolist() == [want]
    a1111 = _context(pipe, prompt)[0]
    assert float(np.abs(got - a1111[:, :77]).max()) <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _context(pipe, prompt)  # the A1111 syntax encodes it all: no warning


# ----------------------------------------------------------------------------- textual inversion
@pytest.fixture(scope="module")
def emb_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("embeddings")
    rng = np.random.RandomState(1)
    save_file({"<cat-toy>": rng.randn(2, 32).astype(np.float32)}, str(d / "learned_embeds.safetensors"))
    sub = d / "styles"
    sub.mkdir()
    save_file({"emb_params": rng.randn(3, 32).astype(np.float32)}, str(sub / "my-style.safetensors"))
    return str(d)


def test_textual_inversion_equals_diffusers(tiny, emb_files):
    from diffusers import StableDiffusionPipeline as TorchPipeline

    from sd_jax.pipeline import StableDiffusionPipeline
    folder, _, _ = tiny
    ref = TorchPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.load_textual_inversion(os.path.join(emb_files, "learned_embeds.safetensors"))
    ref.load_textual_inversion(os.path.join(emb_files, "styles", "my-style.safetensors"), token="my-style")
    pipe = StableDiffusionPipeline.from_pretrained(folder, embeddings_dir=emb_files)
    assert pipe.embeddings == {"<cat-toy>": 2, "my-style": 3}
    prompt = "a <cat-toy> on a blue square, my-style"
    conv = ref.maybe_convert_prompt(prompt, ref.tokenizer)
    want_ids = ref.tokenizer(conv, padding="max_length", max_length=77, truncation=True)["input_ids"]
    with torch.no_grad():
        want = ref.encode_prompt(prompt, "cpu", 1, False)[0].numpy()
    for syntax in ("plain", "a1111"):
        got, _, batch = _context(pipe, prompt, syntax)
        assert batch["ids"].tolist() == [want_ids], syntax
        diff = float(np.abs(got - want).max())
        print(f"{syntax}: max |diff| {diff:.2e}")
        assert diff <= TOL
    assert max(want_ids) >= len(ref.tokenizer) - 5  # the new tokens are past the vocabulary


def test_embedding_errors_leave_the_pipeline_unchanged(tiny, tmp_path):
    _, _, pipe = tiny
    before = (len(pipe.tokenizer), pipe.models, dict(pipe.embeddings))
    save_file({"emb_params": np.zeros((1, 48), np.float32)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"width 48.*takes 32.*another model family"):
        pipe.load_embeddings(str(tmp_path / "wide.safetensors"))
    save_file({"emb_params": np.zeros((1, 32), np.float32)}, str(tmp_path / "red.safetensors"))
    with pytest.raises(ValueError, match="'red' is already a token"):
        pipe.load_embeddings(str(tmp_path / "red.safetensors"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in ("a", "b"):
        save_file({"emb_params": np.zeros((1, 32), np.float32)}, str(tmp_path / sub / "twin.safetensors"))
    with pytest.raises(ValueError, match="'twin': the name is used twice"):
        pipe.load_embeddings([str(tmp_path / "a"), str(tmp_path / "b")])
    (tmp_path / "old.pt").write_bytes(b"not read")
    with pytest.raises(ValueError, match="is a pickle"):
        pipe.load_embeddings(str(tmp_path / "old.pt"))
    assert (len(pipe.tokenizer), pipe.models, dict(pipe.embeddings)) == before
    # an A1111 .pt, read with the pickle opt-in: named after its file, its string_to_param vectors
    vec = torch.randn(2, 32)
    torch.save({"string_to_param": {"*": vec}, "name": "other", "step": 100}, str(tmp_path / "old.pt"))
    from sd_jax.prompts.embeddings import read_embedding
    (e,) = read_embedding(str(tmp_path / "old.pt"), allow_pickle=True)
    assert e.name == "old" and e.count == 2 and np.array_equal(e.vectors[None], vec.numpy())
    from sd_jax.request import GenerationRequest, RequestError
    with pytest.raises(RequestError, match="prompt_syntax must be"):
        GenerationRequest("x", prompt_syntax="compel")


# ----------------------------------------------------------------------------- the command line
SHAPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "sd-jax-shapes")


def test_cli_prompt_pasted_back_from_png_reproduces_the_image(tmp_path, capsys):
    """``sd-jax generate`` with emphasis, BREAK and an embedding (``--embeddings-dir``): the PNG's
    A1111 ``parameters`` prompt, pasted back with the same settings, gives the same pixels; an
    embedding of another model's width is a one-line error."""
    from PIL import Image

    from sd_jax import cli
    emb = tmp_path / "emb"
    emb.mkdir()
    save_file({"emb_params": np.random.RandomState(2).randn(2, 128).astype(np.float32)},
              str(emb / "my-style.safetensors"))
    prompt = "a (red:1.3) circle BREAK on a [blue] square, my-style"
    common = ["--model", SHAPES, "--size", "64x64", "--steps", "2", "--embeddings-dir", str(emb), "--no-progress"]
    assert cli.main(["generate", prompt, "-o", str(tmp_path / "a.png")] + common) == 0
    with Image.open(tmp_path / "a.png") as im:
        params, first = im.text["parameters"], np.asarray(im)
    pasted = params.rsplit("\n", 1)[0]
    assert pasted == prompt and "Steps: 2" in params and "Size: 64x64" in params
    assert cli.main(["generate", pasted, "-o", str(tmp_path / "b.png")] + common) == 0
    with Image.open(tmp_path / "b.png") as im:
        assert np.array_equal(np.asarray(im), first)
    capsys.readouterr()
    save_file({"emb_params": np.zeros((1, 768), np.float32)}, str(emb / "sd15-thing.safetensors"))
    assert cli.main(["generate", prompt, "-o", str(tmp_path / "c.png")] + common) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sd-jax: error: embedding 'sd15-thing'") and "768" in err[0], err
    assert not (tmp_path / "c.png").exists()


def test_sdxl_embedding_clip_l_clip_g_equals_diffusers(tmp_path):
    """An SDXL embedding (clip_l for the first encoder, clip_g for the second), 2 vectors:
    token ids of both tokenizers, context and pooled embedding as diffusers' after loading each
    part with ``load_textual_inversion(..., text_encoder=, tokenizer=)``."""
    from test_sdxl_pipeline import build_tiny_sdxl

    from sd_jax.pipeline import StableDiffusionPipeline, _batch_ids, encode_prompt
    from sd_jax.request import GenerationRequest
    folder = str(tmp_path / "xl")
    ref = build_tiny_sdxl(folder)
    rng = np.random.RandomState(3)
    parts = {"clip_l": rng.randn(2, 32).astype(np.float32), "clip_g": rng.randn(2, 32).astype(np.float32)}
    save_file(parts, str(tmp_path / "xl-style.safetensors"))
    ref.load_textual_inversion(torch.from_numpy(parts["clip_l"]), token="xl-style", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(torch.from_numpy(parts["clip_g"]), token="xl-style", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.load_embeddings(str(tmp_path / "xl-style.safetensors")) == ["xl-style"]
    prompt = "a red circle, xl-style"
    with torch.no_grad():
        ctx_ref, _, pooled_ref, _ = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
    for syntax in ("plain", "a1111"):
        r, plan = pipe.resolve(GenerationRequest(prompt, guidance=1.0, steps=2, prompt_syntax=syntax))
        batch = pipe._inputs(plan, [r])
        for key, tok in (("ids", ref.tokenizer), ("ids_2", ref.tokenizer_2)):
            want = tok(ref.maybe_convert_prompt(prompt, tok), padding="max_length", max_length=77)["input_ids"]
            assert batch[key].tolist() == [want], (syntax, key)
        enc = pipe.family.prompt
        c = encode_prompt(pipe.models, enc, pipe.params, _batch_ids(enc, batch), None,
                          weights=_batch_ids(enc, batch, what="weights"))
        for ours, theirs in ((c.context, ctx_ref), (c.pooled, pooled_ref)):
            diff = float(np.abs(np.asarray(ours) - theirs.numpy()).max())
            print(f"{syntax}: max |diff| {diff:.2e}")
            assert diff <= TOL


# ----------------------------------------------------------------------------- prompt editing
SCHEDULE_EXAMPLES = [  # A1111's get_learned_conditioning_prompt_schedules docstring, 10 steps
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
]


@pytest.mark.parametrize("text,want", SCHEDULE_EXAMPLES)
def test_prompt_schedule_gives_a1111_documented_schedules(text, want):
    from sd_jax.prompts.schedule import prompt_schedule
    assert prompt_schedule(text, 10) == want


def test_prompt_editing_switches_at_the_step_of_two_split_runs(tiny):
    """``[a red circle:a blue square:1]`` over 4 dpmpp_2m steps (A1111: the first text at steps
    0..1, the second from 2) equals a run of steps [0, 2) on the first prompt continued (sampler
    state passed on) over [2, 4) on the second.  Measured max |diff| 3.6e-7; tolerance 5e-6.
    Alternation ``[green|yellow]`` gives each step's text index (A1111: steps 0 and 1 both use
    the first option)."""
    import jax
    import jax.numpy as jnp

    from sd_jax.diffusion.denoisers import classifier_free_guidance, unet_denoiser
    from sd_jax.diffusion.sampling import sample
    from sd_jax.pipeline import _batch_ids, encode_prompt, vae_decode
    from sd_jax.prompts.editing import variants
    from sd_jax.request import GenerationRequest
    _, _, pipe = tiny
    assert variants("x [a:b:2] [c|d]", 5, 5) == (["x a c", "x a d", "x b c", "x b d"], [0, 0, 1, 2, 3])
    r, plan = pipe.resolve(GenerationRequest("a [red|blue] circle", "[a:b:0.5] c", steps=6))
    assert plan.prompt_variants == 2
    inputs = pipe._inputs(plan, [r])
    assert inputs["prompt_steps"].tolist() == [[0, 0, 1, 0, 1, 0]]
    assert inputs["neg_prompt_steps"].tolist() == [[0, 0, 0, 0, 1, 1]] and inputs["ids"].shape == (1, 2 * 77)

    lat = np.random.RandomState(0).randn(1, 16, 16, 4).astype(np.float32)
    prompt, neg = "[a red circle:a blue square:1]", "a green triangle"
    got = pipe(prompt, neg, latents=lat, num_inference_steps=4, guidance_scale=6.0, height=32, width=32,
               scheduler="dpmpp_2m", output_type="np")

    def cond(text):
        r1, p1 = pipe.resolve(GenerationRequest(text, guidance=1.0, steps=4))
        b = pipe._inputs(p1, [r1])
        enc = pipe.family.prompt
        return encode_prompt(pipe.models, enc, pipe.params, _batch_ids(enc, b), None,
                             weights=_batch_ids(enc, b, what="weights"))
    make = lambda c: unet_denoiser(pipe.models.unet, pipe.params["unet"], c)  # noqa: E731
    fn = lambda c, u: classifier_free_guidance(make, c, u, jnp.asarray([6.0]), jnp.zeros(1))  # noqa: E731
    sampler = pipe.sampler("dpmpp_2m", 4)
    red, blue, green = cond("a red circle"), cond("a blue square"), cond("a green triangle")

    @jax.jit
    def split_runs(x):
        x, state = sample(fn(red, green), sampler, x * sampler.init_noise_sigma, start=0, end=2)
        x, _ = sample(fn(blue, green), sampler, x, start=2, end=4, state=state)
        return vae_decode(pipe.models, pipe.params, x)
    want = np.asarray(split_runs(jnp.asarray(lat)))
    diff = float(np.abs(got - want).max())
    print(f"max |diff| {diff:.2e}")
    assert diff <= 5e-6
    assert float(np.abs(np.asarray(red.context) - np.asarray(blue.context)).max()) > 0.1  # two distinct texts
