"""Fast CLIP text encoder (taxamap.models.text): same tokens and embeddings as open_clip, without it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from taxamap.errors import TaxamapError
from taxamap.models.clip import load_clip
from taxamap.models.hub import DEFAULT_CONFIG
from taxamap.models.text import (
    ClipTokenizer,
    bpe_vocab_path,
    byte_unicode_table,
    get_tokenizer,
    load_text_encoder,
    text_spec,
)
from tests.helpers.tiny import write_repo
from tests.helpers.tiny.clip import CONFIG as TINY_CONFIG

REPO = "MVRL/taxabind-vit-b-16"
CARDINAL = "Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis"
OAK = "Plantae Tracheophyta Magnoliopsida Fagales Fagaceae Quercus alba"
ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    CARDINAL,
    OAK,
    "Animalia Arthropoda Insecta Lepidoptera Nymphalidae Danaus plexippus",
    "Fungi Basidiomycota Agaricomycetes Agaricales Amanitaceae Amanita muscaria",
    "Animalia Chordata Mammalia Carnivora Ursidae Ursus arctos horribilis",
    "Cardinalis cardinalis",
    "CARDINALIS CARDINALIS",
    "  Cardinalis\t\tcardinalis \n ",
    "a photo of a Northern Cardinal.",
    "Quercus × alba",
    "Pinus sp.",
    "Homo sapiens (Linnaeus, 1758)",
    "Aves: Passeriformes; Cardinalidae!!!",
    "it's the bird's nest, they'll've, we'd, I'm, you're",
    "IT'S THE BIRD'S",
    "numbers 1234567890 and 3.14159 and 1e-5",
    "Müller's Ötzi café naïve façade",
    "Ærø Ångström Øresund",
    "日本語のテキスト 東京",
    "Ελληνικά κείμενο",
    "Русский текст, ёжик",
    "emoji 🐦🦅🌳 and flags 🇺🇸",
    "Tom &amp; Jerry &lt;3 &gt;",
    "double escaped &amp;amp; &amp;lt;tag&amp;gt;",
    "&quot;quoted&quot; &#39;single&#39; &#x1F426;",
    "mojibake: cafÃ© and â€œquotesâ€\x9d",
    "soft\u00adhyphen and non\u00a0breaking and zero\u200bwidth",
    "tabs\tand\nnewlines\r\nand\x0bvertical",
    "<start_of_text> inside <end_of_text> text",
    "<START_OF_TEXT> upper special",
    "x",
    ".",
    "a",
    "!!!???...",
    "under_score snake_case_name",
    "hyphen-ated co-occurring well-known",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join([CARDINAL] * 12),  # far more than 77 tokens
    " ".join(f"word{i}" for i in range(200)),
    "🐦" * 60,
]


# ------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def open_clip():
    import open_clip

    return open_clip


def test_vocab_file_is_found_without_importing_open_clip():
    path = bpe_vocab_path()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and path.is_file()
    table = byte_unicode_table()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == chr(256 + 32)


def test_tokenizer_equals_open_clip_tokenize(open_clip):
    ours = get_tokenizer()(TEXTS)
    ref = open_clip.tokenize(TEXTS).numpy()
    assert ours.dtype == np.int64 and ours.shape == (len(TEXTS), 77)
    mismatched = [t for t, a, b in zip(TEXTS, ours, ref) if not np.array_equal(a, b)]
    assert not mismatched
    # The long texts really were truncated with the end token kept last.
    long_rows = ours[[TEXTS.index(t) for t in TEXTS if len(t) > 300]]
    assert (long_rows[:, -1] == 49407).all() and (long_rows[:, 0] == 49406).all()


def test_tokenizer_equals_open_clip_get_tokenizer_for_the_repo(open_clip, tmp_path):
    folder = write_repo(tmp_path, REPO)
    ref = open_clip.get_tokenizer(f"local-dir:{folder}")
    ours = get_tokenizer(TINY_CONFIG["model_cfg"]["text_cfg"]["context_length"])
    np.testing.assert_array_equal(ours(TEXTS), ref(TEXTS).numpy())


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_tokenizer_clean_modes_and_context_length(open_clip, clean):
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer(context_length=16, clean=clean, additional_special_tokens=["<taxon>"])
    ours = ClipTokenizer(context_length=16, clean=clean, additional_special_tokens=["<taxon>"])
    texts = TEXTS + ["<taxon> Cardinalis <TAXON> cardinalis"]
    assert ours.vocab_size == ref.vocab_size == 49409
    np.testing.assert_array_equal(ours(texts), ref(texts).numpy())


# ------------------------------------------------------------------------------------------------
# Embeddings


def write_variant(folder: Path, text_updates: dict, model_updates: dict | None = None,
                  seed: int = 0, bin_weights: bool = False) -> Path:
    """A tiny open_clip CLIP with a modified text config (same layout as tests/tiny/clip.py)."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["model_cfg"]["text_cfg"].update(text_updates)
    cfg["model_cfg"].update(model_updates or {})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = CLIP(**cfg["model_cfg"])
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
            else:  # LayerNorm/bias/layer-scale vectors off their defaults, so a swap would show
                p.add_(0.1 * torch.randn_like(p))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if bin_weights:
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    else:
        save_file(state, str(folder / "open_clip_model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text_models")
    write_repo(root, REPO)
    return root


def test_encode_text_equals_load_clip(tiny_models):
    fast = load_text_encoder(tiny_models, config=dict(DEFAULT_CONFIG), backend="numpy")
    slow = load_clip(tiny_models, config=dict(DEFAULT_CONFIG))
    prompts = TEXTS[:12] + TEXTS[-3:]
    ours, ref = fast.encode_text(prompts), slow.encode_text(prompts)
    assert ours.dtype == np.float32 and ours.shape == (len(prompts), 512)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert np.abs(ours[0] - ours[1]).max() > 0.05  # different prompts, different embeddings
    assert fast.ref == slow.ref and fast.device.type == "cpu" and fast.embed_dim == 512
    assert fast.backend == "numpy" and str(fast.device) == "cpu"
    # The torch backend gives the same vectors.
    via_torch = load_text_encoder(tiny_models, config=dict(DEFAULT_CONFIG), backend="torch")
    assert via_torch.backend == "torch" and via_torch.device.type == "cpu"
    np.testing.assert_allclose(via_torch.encode_text(prompts), ours, atol=1e-5, rtol=0)
    np.testing.assert_allclose(via_torch.encode_text(prompts), ref, atol=1e-5, rtol=0)
    # Batching and order do not change a prompt's embedding.
    np.testing.assert_allclose(fast.encode_text([OAK]), ours[1:2], atol=1e-6)
    np.testing.assert_allclose(fast.encode_text(CARDINAL), ours[0:1], atol=1e-6)
    # Small batches (prompts regrouped by token length) put every row back in its place.
    small = load_text_encoder(tiny_models, config=dict(DEFAULT_CONFIG), batch_size=4)
    np.testing.assert_allclose(small.encode_text(prompts), ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "text_updates, model_updates",
    [
        ({"layers": 3, "width": 32, "heads": 4, "mlp_ratio": 2.0}, {"quick_gelu": True}),
        ({"layers": 2, "ls_init_value": 0.5, "proj_bias": True}, {}),
        ({"layers": 2, "no_causal_mask": True, "pad_id": 0}, {}),
        ({"layers": 2, "pool_type": "last", "context_length": 20}, {"embed_dim": 24}),
    ],
    ids=["deep-quickgelu", "layerscale-projbias", "bidirectional", "last-pool-ctx20"],
)
def test_supported_variants_equal_open_clip(tmp_path, text_updates, model_updates):
    folder = write_variant(tmp_path / REPO, text_updates, model_updates, seed=3)
    slow = load_clip(tmp_path, config=dict(DEFAULT_CONFIG))
    prompts = [CARDINAL, OAK, "x", TEXTS[-2]]
    ref = slow.encode_text(prompts)
    for backend in ("numpy", "torch"):
        fast = load_text_encoder(tmp_path, config=dict(DEFAULT_CONFIG), backend=backend)
        assert fast.backend == backend
        ours = fast.encode_text(prompts)
        assert ours.shape == (4, model_updates.get("embed_dim", 512)) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0, err_msg=backend)
        # Regrouped small batches (padding trimmed per batch) give the same rows.
        small = load_text_encoder(tmp_path, config=dict(DEFAULT_CONFIG), backend=backend, batch_size=1)
        np.testing.assert_allclose(small.encode_text(prompts), ours, atol=1e-6, rtol=0, err_msg=backend)
    assert folder.is_dir()


def test_bin_weights_fallback(tmp_path):
    write_variant(tmp_path / REPO, {}, bin_weights=True, seed=5)
    slow = load_clip(tmp_path, config=dict(DEFAULT_CONFIG))
    ref = slow.encode_text([CARDINAL, OAK])
    for backend in ("numpy", "torch"):
        fast = load_text_encoder(tmp_path, config=dict(DEFAULT_CONFIG), backend=backend)
        np.testing.assert_allclose(fast.encode_text([CARDINAL, OAK]), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_safetensors(tmp_path, dtype):
    """A checkpoint saved in bf16/fp16 loads as float32 on both backends (NumPy has no bf16)."""
    from safetensors.torch import load_file, save_file

    folder = write_repo(tmp_path, REPO, seed=2)
    path = folder / "open_clip_model.safetensors"
    state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
             for k, v in load_file(str(path)).items()}
    save_file(state, str(path), metadata={"format": "pt"})
    a = load_text_encoder(tmp_path, config=dict(DEFAULT_CONFIG), backend="numpy")
    b = load_text_encoder(tmp_path, config=dict(DEFAULT_CONFIG), backend="torch")
    key = "transformer.resblocks.0.attn.in_proj_weight"
    assert a.tower.state[key].dtype == np.float32
    np.testing.assert_array_equal(a.tower.state[key], b.tower.state[key].numpy())
    np.testing.assert_array_equal(a.tower.state[key], state[key].float().numpy())
    np.testing.assert_allclose(a.encode_text(TEXTS[:6]), b.encode_text(TEXTS[:6]), atol=1e-5, rtol=0)


def test_backend_choice(tiny_models):
    cfg = dict(DEFAULT_CONFIG)
    # torch is imported in this process: "auto" uses it on the CPU (it costs nothing more)...
    assert load_text_encoder(tiny_models, device="auto", config=cfg).backend == "torch"
    assert load_text_encoder(tiny_models, device=None, config=cfg).backend == "torch"
    assert load_text_encoder(tiny_models, device=torch.device("cpu"), config=cfg).backend == "torch"
    assert load_text_encoder(tiny_models, config=cfg, backend="numpy").backend == "numpy"
    with pytest.raises(TaxamapError, match="CPU only"):
        load_text_encoder(tiny_models, device="cuda", config=cfg, backend="numpy")
    # ...and NumPy where torch is not imported yet (a warm predict never imports it).
    script = ("import sys\nfrom taxamap.models.text import load_text_encoder\n"
              f"enc = load_text_encoder({str(tiny_models)!r}, config={cfg!r})\n"
              "print(enc.backend, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["numpy", "False"]
    with pytest.raises(TaxamapError, match="unknown text backend"):
        load_text_encoder(tiny_models, config=cfg, backend="jax")
    if not torch.cuda.is_available():  # device="cuda" means torch, which then says there is no GPU
        with pytest.raises(TaxamapError, match="no CUDA GPU"):
            load_text_encoder(tiny_models, device="cuda", config=cfg)


def test_gelu_is_exact_with_and_without_scipy(monkeypatch):
    from taxamap.models import text

    x = np.linspace(-12, 12, 4001, dtype=np.float32).reshape(1, -1)
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    text._erf.cache_clear()
    np.testing.assert_allclose(text._gelu(x.copy()), ref, atol=1e-6, rtol=1e-6)
    monkeypatch.setitem(sys.modules, "scipy.special", None)  # "import scipy.special" now fails
    text._erf.cache_clear()
    try:
        out = text._gelu(x.copy())
        fallback = text._erf()
    finally:
        text._erf.cache_clear()
    monkeypatch.undo()
    from scipy.special import erf

    assert fallback is not erf  # the standard-library path really ran
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)
    q = text._quick_gelu(x.copy())
    np.testing.assert_allclose(q, (torch.from_numpy(x) * torch.sigmoid(1.702 * torch.from_numpy(x))).numpy(),
                               atol=1e-6, rtol=1e-6)


def test_bad_prompts_and_empty_batch(tiny_models):
    enc = load_text_encoder(tiny_models, config=dict(DEFAULT_CONFIG))
    assert enc.encode_text([]).shape == (0, 512)
    for bad in ["", "   ", None]:
        with pytest.raises(TaxamapError, match="non-empty string"):
            enc.encode_text([CARDINAL, bad])


def test_subnormal_weights_are_flushed(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_repo(tmp_path, REPO)
    path = folder / "open_clip_model.safetensors"
    state = load_file(str(path))
    state["transformer.resblocks.0.mlp.c_fc.weight"][0, :4] = 1e-40
    state["token_embedding.weight"][49406, :4] = 1e-40  # the start token: in every prompt
    state["positional_embedding"][0, :4] = 0
    save_file(state, str(path))
    out = {}
    for backend in ("numpy", "torch"):
        enc = load_text_encoder(tmp_path, config=dict(DEFAULT_CONFIG), backend=backend)
        w = enc.tower.state["transformer.resblocks.0.mlp.c_fc.weight"]
        assert (w[0, :4] == 0).all() and (w[0, 4:] != 0).all(), backend
        out[backend] = enc.encode_text([CARDINAL, OAK])
    # NumPy maps the token table (a prompt reads a few rows of it) and flushes the rows it reads.
    assert isinstance(enc.tower.state["token_embedding.weight"], torch.Tensor)
    numpy_enc = load_text_encoder(tmp_path, config=dict(DEFAULT_CONFIG), backend="numpy")
    assert isinstance(numpy_enc.tower.state["token_embedding.weight"], np.memmap)
    np.testing.assert_allclose(out["numpy"], out["torch"], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "text_updates, model_updates, named",
    [
        ({"hf_model_name": "roberta-base"}, {}, "hf_model_name"),
        ({"hf_tokenizer_name": "bert-base-uncased"}, {}, "hf_tokenizer_name"),
        ({"embed_cls": True}, {}, "embed_cls"),
        ({"final_ln_after_pool": True}, {}, "final_ln_after_pool"),
        ({"act_kwargs": {"approximate": "tanh"}}, {}, "act_kwargs"),
        ({"norm_kwargs": {"eps": 1e-6}}, {}, "norm_kwargs"),
        ({"block_type": "custom"}, {}, "block_type"),
        ({"qk_norm": True}, {}, "qk_norm"),
        ({"pool_type": "mean"}, {}, "pool_type"),
        ({"proj_type": "mlp"}, {}, "proj_type"),
        ({"tokenizer_kwargs": {"reduction_mask": "simple"}}, {}, "reduction_mask"),
        ({"brand_new_setting": 1}, {}, "brand_new_setting"),
        ({}, {"multimodal_cfg": {"width": 512}}, "multimodal_cfg"),
    ],
)
def test_unsupported_settings_are_refused(text_updates, model_updates, named):
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["model_cfg"]["text_cfg"].update(text_updates)
    cfg["model_cfg"].update(model_updates)
    with pytest.raises(TaxamapError, match=named) as info:
        text_spec(cfg)
    assert "\n" not in str(info.value) and "load_clip" in str(info.value)


def test_unsupported_config_refused_by_loader(tmp_path):
    folder = write_repo(tmp_path, REPO)
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["embed_cls"] = True
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TaxamapError, match="embed_cls"):
        load_text_encoder(tmp_path, config=dict(DEFAULT_CONFIG))


def test_weights_not_matching_config_are_refused(tmp_path):
    folder = write_repo(tmp_path, REPO)
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["width"] = 32
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TaxamapError, match="do not match"):
        load_text_encoder(tmp_path, config=dict(DEFAULT_CONFIG))
    cfg["model_cfg"]["text_cfg"].update(width=16, layers=2)
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TaxamapError, match="resblocks.1"):
        load_text_encoder(tmp_path, config=dict(DEFAULT_CONFIG))


# ------------------------------------------------------------------------------------------------
# No open_clip import


@pytest.mark.slow
def test_encode_text_never_imports_open_clip(tiny_models):
    script = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from taxamap.models.text import load_text_encoder\n"
        f"enc = load_text_encoder({str(tiny_models)!r})\n"
        f"v = enc.encode_text([{CARDINAL!r}])\n"
        "assert v.shape == (1, 512), v.shape\n"
        "print('open_clip' in sys.modules, any(m.startswith('transformers') for m in sys.modules),"
        " round(time.perf_counter() - t, 3))\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    open_clip_loaded, transformers_loaded, _seconds = out.stdout.split()
    assert open_clip_loaded == "False" and transformers_loaded == "False"


@pytest.mark.slow
@pytest.mark.parametrize("source", ["models_dir", "hf_cache"])
def test_numpy_backend_never_imports_torch(tiny_models, tmp_path, source):
    """Module import, file resolution (models folder or offline Hugging Face cache), weight load
    and encoding all run without torch."""
    import shutil

    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    if source == "models_dir":
        where = str(tiny_models)
    else:
        commit = "0123456789abcdef0123456789abcdef01234567"
        cache = tmp_path / "hf" / "models--MVRL--taxabind-vit-b-16"
        shutil.copytree(tiny_models / REPO, cache / "snapshots" / commit)
        (cache / "refs").mkdir()
        (cache / "refs" / "main").write_text(commit)
        env.update(HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
        env.pop("TAXAMAP_MODELS", None)
        where = None
    script = (
        "import sys\n"
        "from taxamap.models.text import load_text_encoder\n"
        f"enc = load_text_encoder({where!r}, backend='numpy')\n"
        f"v = enc.encode_text([{CARDINAL!r}, {OAK!r}])\n"
        "assert v.shape == (2, 512) and abs(float((v[0] ** 2).sum()) - 1) < 1e-5, v.shape\n"
        "print(enc.backend, enc.ref, sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    backend, ref, torch_modules = out.stdout.split()
    assert backend == "numpy" and torch_modules == "[]", out.stdout
    if source == "hf_cache":
        assert ref == f"{REPO}@{commit}"
