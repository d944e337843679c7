"""TaxaBind's CLIP text encoder without open_clip: the fast path for prompt embeddings.

``import open_clip`` alone costs ~2.3 s (its package imports CoCa/transformers), and
:func:`taxamap.models.clip.load_clip` builds and loads the whole CLIP (vision tower included) to
embed one prompt. This module reads the same files (``open_clip_config.json`` +
``open_clip_model.safetensors`` of the clip repo), loads only the text tower's tensors, and runs the
open_clip ``TextTransformer`` math (pre-LN transformer with causal attention, final LayerNorm,
pooling at the end-of-text token, linear projection, L2-normalised) with plain torch functions.

The tokenizer reproduces open_clip's ``SimpleTokenizer`` (the BPE used by every OpenAI-style CLIP):
text cleaning, pre-tokenisation regex, byte-to-unicode table, BPE merges read from the
``bpe_simple_vocab_16e6.txt.gz`` file shipped in the installed open_clip package (located without
importing it), start/end tokens, truncation that keeps the end token, zero padding.

Two backends run that math: NumPy (the CPU default) never imports torch, which alone costs
1-2 s of process start-up, most of a warm ``taxamap predict``; torch serves GPUs, and the CPU in a
process that has imported torch anyway (the web app). Both are float32.

Configs this module does not reproduce exactly (Hugging Face text towers, CoCa, custom attention
blocks, ...) raise a one-line :class:`TaxamapError`; callers then fall back to ``load_clip``.
Results equal ``load_clip(...).encode_text`` to float32 rounding (~1e-6) on CPU; on CUDA this path
stays float32 (``load_clip`` uses bf16 autocast there).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import logging
import os
import string
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.models.clip import CONFIG_KEY as CLIP_CONFIG_KEY
from taxamap.models import hub
from taxamap.models.preprocess import check_prompts

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
START_TOKEN = "<start_of_text>"
END_TOKEN = "<end_of_text>"
DEFAULT_CONTEXT_LENGTH = 77
#: open_clip's SimpleTokenizer uses this many lines of the merges file (after its header line):
#: 49152 - 256 - 2 merges, so that bytes + bytes</w> + merges + 2 specials = 49408 ids.
_N_MERGES = 49152 - 256 - 2

# text_cfg keys and the values whose behaviour this module reproduces. A key absent here, or a
# value other than these, makes load_text_encoder refuse (the caller falls back to open_clip).
_FREE_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
              "ls_init_value", "no_causal_mask", "pool_type", "eos_id", "proj_bias", "proj_type",
              "tokenizer_kwargs",
              # No effect on CLIP.encode_text in open_clip 3.3 (used only by CoCa / pad masks / HF):
              "pad_id", "output_tokens", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type",
              "tokenizer_mode"}
_FALSY_KEYS = {"hf_model_name", "hf_tokenizer_name", "embed_cls", "final_ln_after_pool",
               "act_kwargs", "norm_kwargs", "qk_norm", "scaled_cosine_attn", "scale_heads",
               "scale_attn_inner", "scale_attn", "scale_fc"}
_POOL_TYPES = ("argmax", "eos", "first", "last", "none")
#: open_clip's LayerNorm eps (torch.nn.LayerNorm default; text_cfg.norm_kwargs is refused).
_LN_EPS = 1e-5
BACKENDS = ("auto", "numpy", "torch")
_CLEAN_TYPES = ("lower", "whitespace", "canonicalize")


# ----------------------------------------------------------------------------------------------
# Tokenizer


def bpe_vocab_path() -> Path:
    """The BPE merges file shipped inside the installed open_clip package, found without running
    the package's ``__init__`` (``find_spec`` of a top-level package only locates it)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / BPE_FILE
        if path.is_file():
            return path
    raise TaxamapError(
        f"the CLIP tokenizer vocabulary {BPE_FILE} was not found: install open_clip_torch "
        "(pip install open_clip_torch), which ships it"
    )


@lru_cache(maxsize=1)
def byte_unicode_table() -> dict[int, str]:
    """Byte -> printable unicode character, as in OpenAI's CLIP BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, soft hyphen...)
    map, in byte order, to code points from 256 upwards, so no BPE symbol is whitespace.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=4)
def _read_merges(path: str) -> tuple[tuple[str, str], ...]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; open_clip keeps exactly the next _N_MERGES lines.
    return tuple(tuple(line.split()) for line in lines[1:_N_MERGES + 1])


def _fix_text():
    try:
        import ftfy
    except ImportError:  # open_clip requires ftfy; without it only its mojibake repair is skipped
        return lambda s: s
    return ftfy.fix_text


def _clean(text: str, mode: str, fix) -> str:
    text = html.unescape(html.unescape(fix(text))).strip()
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
        return " ".join(text.split()).strip()
    text = " ".join(text.split()).strip()
    return text.lower() if mode == "lower" else text


class ClipTokenizer:
    """open_clip's ``SimpleTokenizer`` (OpenAI CLIP BPE), reimplemented.

    ``tokenize(texts)`` -> int64 array (N, context_length): start id, BPE ids, end id, zero padding;
    texts longer than the context are cut and their last id replaced by the end id.
    """

    def __init__(
        self,
        bpe_path: str | os.PathLike | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        clean: str = "lower",
        additional_special_tokens: Sequence[str] | None = None,
    ):
        try:
            import regex
        except ImportError as exc:  # a dependency of open_clip_torch and transformers
            raise TaxamapError("the CLIP tokenizer needs the 'regex' package: pip install regex") from exc
        if clean not in _CLEAN_TYPES:
            raise TaxamapError(f"unknown tokenizer clean mode {clean!r}; expected one of {_CLEAN_TYPES}")
        if int(context_length) < 2:
            raise TaxamapError(f"context_length must be at least 2, got {context_length}")
        self.context_length = int(context_length)
        self.clean = clean
        self._fix = _fix_text()
        self._bytes = byte_unicode_table()
        merges = _read_merges(str(bpe_path or bpe_vocab_path()))
        symbols = list(self._bytes.values())
        symbols += [s + "</w>" for s in symbols]
        symbols += ["".join(m) for m in merges]
        specials = [START_TOKEN, END_TOKEN, *(additional_special_tokens or [])]
        symbols += specials
        self.encoder: dict[str, int] = {s: i for i, s in enumerate(symbols)}
        self.ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.vocab_size = len(self.encoder)
        self.start_id = self.encoder[START_TOKEN]
        self.end_id = self.encoder[END_TOKEN]
        self._special = {s: self.encoder[s] for s in specials}
        # Special tokens first, so "<end_of_text>" typed in a prompt becomes that one id, as in
        # open_clip; then contractions, letter runs, single digits, other non-space runs.
        alternatives = "|".join(regex.escape(s) for s in specials)
        self._pattern = regex.compile(
            alternatives + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self._cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[str]:
        """Merge the symbols of one pre-token, lowest-ranked adjacent pair first."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            # Left to right, non-overlapping: "a a a" with (a, a) -> "aa a".
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` (cleaned), without start/end ids."""
        ids: list[int] = []
        for piece in self._pattern.findall(_clean(text, self.clean, self._fix)):
            if piece in self._special:
                ids.append(self._special[piece])
                continue
            word = "".join(self._bytes[b] for b in piece.encode("utf-8"))
            cached = self._cache.get(word)
            if cached is None:
                cached = [self.encoder[s] for s in self._bpe(word)]
                if len(self._cache) < 100_000:
                    self._cache[word] = cached
            ids.extend(cached)
        return ids

    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """Token ids, int64 (N, context_length), the layout open_clip's tokenizer returns."""
        if isinstance(texts, str):
            texts = [texts]
        n_ctx = int(context_length or self.context_length)
        out = np.zeros((len(texts), n_ctx), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text), self.end_id]
            if len(ids) > n_ctx:
                ids = ids[:n_ctx]
                ids[-1] = self.end_id
            out[row, :len(ids)] = ids
        return out

    __call__ = tokenize


@lru_cache(maxsize=8)
def _shared_tokenizer(bpe_path: str, context_length: int, clean: str, specials: tuple) -> ClipTokenizer:
    return ClipTokenizer(bpe_path, context_length, clean, list(specials) or None)


def get_tokenizer(context_length: int = DEFAULT_CONTEXT_LENGTH, clean: str = "lower",
                  additional_special_tokens: Sequence[str] | None = None) -> ClipTokenizer:
    """A process-wide tokenizer (building the 49 k-entry BPE tables costs ~0.1 s once)."""
    return _shared_tokenizer(str(bpe_vocab_path()), int(context_length), clean,
                             tuple(additional_special_tokens or ()))


# ----------------------------------------------------------------------------------------------
# Config


def _is_falsy(value) -> bool:
    return value is None or value is False or value == "" or value == {} or value == 0


def text_spec(raw: dict, where: str = CONFIG_FILE) -> dict:
    """Validate an ``open_clip_config.json`` and return the text-tower settings this module uses.

    Raises a one-line TaxamapError naming the first setting it does not reproduce.
    """
    model_cfg = raw.get("model_cfg") if isinstance(raw, dict) else None
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("text_cfg"), dict):
        raise TaxamapError(f"{where} has no model_cfg.text_cfg; not an open_clip repo")

    def unsupported(setting: str) -> TaxamapError:
        return TaxamapError(
            f"{where}: the fast text encoder does not support {setting}; "
            "use taxamap.models.clip.load_clip (open_clip) for this model"
        )

    if model_cfg.get("multimodal_cfg"):
        raise unsupported("model_cfg.multimodal_cfg (CoCa)")
    cfg = model_cfg["text_cfg"]
    for key, value in cfg.items():
        if key in _FALSY_KEYS:
            if not _is_falsy(value):
                raise unsupported(f"text_cfg.{key}={value!r}")
        elif key == "block_type":
            if value not in (None, "default"):
                raise unsupported(f"text_cfg.block_type={value!r}")
        elif key not in _FREE_KEYS:
            raise unsupported(f"text_cfg.{key}")

    pool_type = cfg.get("pool_type", "argmax")
    if pool_type not in _POOL_TYPES:
        raise unsupported(f"text_cfg.pool_type={pool_type!r}")
    proj_type = cfg.get("proj_type", "linear")
    if proj_type not in ("linear", "none"):
        raise unsupported(f"text_cfg.proj_type={proj_type!r}")
    tok = cfg.get("tokenizer_kwargs") or {}
    if not isinstance(tok, dict):
        raise unsupported(f"text_cfg.tokenizer_kwargs={tok!r}")
    for key, value in tok.items():
        if key == "clean":
            if value not in _CLEAN_TYPES:
                raise unsupported(f"tokenizer_kwargs.clean={value!r}")
        elif key == "additional_special_tokens":
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise unsupported(f"tokenizer_kwargs.additional_special_tokens={value!r}")
        elif key == "reduction_mask":
            if value:
                raise unsupported(f"tokenizer_kwargs.reduction_mask={value!r}")
        else:
            raise unsupported(f"tokenizer_kwargs.{key}")

    try:
        width = int(cfg.get("width", 512))
        heads = int(cfg.get("heads", 8))
        spec = {
            "context_length": int(cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)),
            "vocab_size": int(cfg.get("vocab_size", 49408)),
            "width": width,
            "heads": heads,
            "layers": int(cfg.get("layers", 12)),
            "mlp_width": int(width * float(cfg.get("mlp_ratio", 4.0))),
            "layer_scale": cfg.get("ls_init_value") is not None,
            "causal": not bool(cfg.get("no_causal_mask", False)),
            "pool_type": pool_type,
            "eos_id": int(cfg.get("eos_id", 2)),
            "projection": None if proj_type == "none" or not model_cfg.get("embed_dim", 1)
            else ("linear" if cfg.get("proj_bias", False) else "matrix"),
            "embed_dim": int(model_cfg.get("embed_dim") or width),
            "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
            "clean": tok.get("clean", "lower"),
            "special_tokens": tuple(tok.get("additional_special_tokens") or ()),
        }
    except (TypeError, ValueError) as exc:
        raise TaxamapError(f"{where}: bad text_cfg value: {exc}") from exc
    if spec["projection"] is None:
        spec["embed_dim"] = width
    if width <= 0 or heads <= 0 or width % heads or spec["layers"] < 0 or spec["context_length"] < 2:
        raise TaxamapError(f"{where}: text_cfg width {width} must be a positive multiple of heads {heads}")
    return spec


# ----------------------------------------------------------------------------------------------
# Weights


def _tower_keys(spec: dict) -> dict[str, tuple]:
    """State-dict key (CLIP layout, no prefix) -> expected shape, for the text tower only."""
    w, m, n = spec["width"], spec["mlp_width"], spec["context_length"]
    keys = {"token_embedding.weight": (spec["vocab_size"], w), "positional_embedding": (n, w),
            "ln_final.weight": (w,), "ln_final.bias": (w,)}
    for i in range(spec["layers"]):
        b = f"transformer.resblocks.{i}."
        keys.update({
            b + "ln_1.weight": (w,), b + "ln_1.bias": (w,),
            b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
            b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
            b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
            b + "mlp.c_fc.weight": (m, w), b + "mlp.c_fc.bias": (m,),
            b + "mlp.c_proj.weight": (w, m), b + "mlp.c_proj.bias": (w,),
        })
        if spec["layer_scale"]:
            keys.update({b + "ls_1.gamma": (w,), b + "ls_2.gamma": (w,)})
    if spec["projection"] == "matrix":
        keys["text_projection"] = (w, spec["embed_dim"])
    elif spec["projection"] == "linear":
        keys["text_projection.weight"] = (spec["embed_dim"], w)
        keys["text_projection.bias"] = (spec["embed_dim"],)
    return keys


def _prefix(names, where: Path) -> str:
    """CLIP saves the text tower at the top level, CustomTextCLIP under ``text.``; DDP adds
    ``module.``."""
    for prefix in ("", "text.", "module.", "module.text."):
        if prefix + "token_embedding.weight" in names:
            return prefix
    raise TaxamapError(f"{where} holds no CLIP text tower (no token_embedding.weight); "
                       "the file is not an open_clip checkpoint, download it again")


def load_text_weights(path: str | os.PathLike, spec: dict, backend: str = "torch") -> dict:
    """Read only the text tower's tensors from a safetensors (or ``.bin``) checkpoint, check their
    shapes against ``spec`` and flush subnormals. Returns {CLIP key: float32 array}: torch tensors
    for ``backend="torch"``, NumPy arrays for ``"numpy"`` (safetensors files are then read without
    importing torch; only the rare ``.bin`` fallback needs it)."""
    if backend not in ("numpy", "torch"):
        raise TaxamapError(f"unknown text backend {backend!r}; use numpy or torch")
    path = Path(path)
    wanted = _tower_keys(spec)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            framework = "np" if backend == "numpy" else "pt"
            with safe_open(str(path), framework=framework, device="cpu") as f:
                names = set(f.keys())
                prefix = _prefix(names, path)
                state = {}
                for k in wanted:
                    if prefix + k not in names:
                        continue
                    dtype = f.get_slice(prefix + k).get_dtype() if backend == "numpy" else None
                    if dtype == "BF16":
                        state[k] = _read_bf16(path, prefix + k)  # NumPy has no bfloat16
                    elif dtype == "F32" and k == "token_embedding.weight":
                        # 40 % of the tower, of which a prompt uses a few rows: map it, read
                        # only those rows (their subnormals are flushed as they are gathered).
                        state[k] = _map_tensor(path, prefix + k)
                    else:
                        state[k] = f.get_tensor(prefix + k)
        else:
            state = _load_bin(path, wanted)
            if backend == "numpy":
                state = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                         for k, v in state.items()}
    except TaxamapError:
        raise
    except Exception as exc:  # corrupt or truncated files come in many exception types
        raise TaxamapError(f"cannot load weights {path}: {exc.__class__.__name__}: {exc}") from exc

    hub.check_state(wanted, state, path, config_name=CONFIG_FILE)
    if backend == "numpy":
        state = {k: v if isinstance(v, np.memmap) else np.require(v, np.float32, "CW")
                 for k, v in state.items()}
        _flush_subnormals_np({k: v for k, v in state.items() if not isinstance(v, np.memmap)})
    else:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        hub.flush_subnormals(state)
    return state


def _tensor_location(path: Path, name: str) -> tuple[int, int, list]:
    """(file offset, byte size, shape) of one tensor of a safetensors file.

    The format: an 8-byte little-endian header size, a JSON header giving each tensor's dtype,
    shape and byte range relative to the end of the header, then the data."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(size))[name]
    begin, end = entry["data_offsets"]
    return 8 + size + begin, end - begin, list(entry["shape"])


def _read_bf16(path: Path, name: str) -> np.ndarray:
    """One bfloat16 tensor of a safetensors file as float32 (bf16 is the top half of a float32)."""
    offset, nbytes, shape = _tensor_location(path, name)
    with open(path, "rb") as f:
        f.seek(offset)
        raw = np.frombuffer(f.read(nbytes), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def _map_tensor(path: Path, name: str) -> np.ndarray:
    """One float32 tensor of a safetensors file, memory-mapped read-only (pages load on use)."""
    offset, nbytes, shape = _tensor_location(path, name)
    if nbytes != 4 * int(np.prod(shape)):
        raise TaxamapError(f"{path}: tensor {name} has {nbytes} bytes for shape {shape}; the file is corrupt")
    return np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=tuple(shape))


def _load_bin(path: Path, wanted: dict) -> dict:
    """The text tensors of a pickled ``.bin`` state dict (``weights_only``: no code runs)."""
    import torch

    try:
        full = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        full = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(full, dict) and isinstance(full.get("state_dict"), dict):
        full = full["state_dict"]
    if not isinstance(full, dict):
        raise TaxamapError(f"{path} does not hold a state dict")
    prefix = _prefix(full.keys(), path)
    state = {k: full[prefix + k].clone() for k in wanted if prefix + k in full}
    del full
    return state


def _flush_subnormals_np(state: dict) -> int:
    """NumPy twin of :func:`taxamap.models.hub.flush_subnormals` (which imports torch): zero
    float32 values with 0 < |x| < tiny in place, as they make CPU matmuls several times slower."""
    tiny = np.finfo(np.float32).tiny
    block = 1 << 16
    # Block by block through two small reused buffers, which stay in cache: whole-array
    # temporaries of the ~250 MB tower cost several times more (page faults, memory traffic).
    mags, small = np.empty(block, np.float32), np.empty(block, bool)
    count = 0
    for value in state.values():
        flat = value.reshape(-1)
        for start in range(0, flat.size, block):
            part = flat[start:start + block]
            n = part.size
            np.abs(part, out=mags[:n])
            # Zeros also pass |x| < tiny; setting them to 0 changes nothing, so one test suffices.
            np.less(mags[:n], tiny, out=small[:n])
            if small[:n].any():
                hit = small[:n]
                count += int(np.count_nonzero(part[hit]))
                part[hit] = 0
    if count:
        log.debug("flushed %d subnormal weights to zero", count)
    return count


# ----------------------------------------------------------------------------------------------
# Model


class TextTower:
    """open_clip's text ``TextTransformer`` (as ``CLIP.encode_text`` runs it), as plain tensors.

    A functional forward keeps the load to exactly the tensors read from the file (no module
    construction and random initialisation of the ~60 M parameters first).
    """

    def __init__(self, spec: dict, state: dict):
        self.spec = spec
        self.state = state

    def to(self, device) -> "TextTower":
        self.state = {k: v.to(device) for k, v in self.state.items()}
        return self

    def forward(self, tokens):
        """int64 (B, L) token ids -> float32 (B, embed_dim) unit-norm embeddings."""
        import torch
        import torch.nn.functional as F

        s, p = self.spec, self.state
        width, heads = s["width"], s["heads"]
        pool = s["pool_type"]
        if s["causal"] and pool in ("argmax", "eos", "first"):
            # With causal attention a position never sees later ones, so positions after the
            # pooled token (the padding) cannot change the result: drop them.
            if pool == "argmax":
                pos = tokens.argmax(dim=-1)
            elif pool == "eos":
                pos = (tokens == s["eos_id"]).int().argmax(dim=-1)
            else:
                pos = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
            length = int(pos.max()) + 1
        else:
            pos, length = None, tokens.shape[1]
        ids = tokens[:, :length]
        batch = ids.shape[0]
        x = F.embedding(ids, p["token_embedding.weight"]) + p["positional_embedding"][:length]
        act = (lambda h: h * torch.sigmoid(1.702 * h)) if s["quick_gelu"] else F.gelu
        for i in range(s["layers"]):
            b = f"transformer.resblocks.{i}."
            h = F.layer_norm(x, (width,), p[b + "ln_1.weight"], p[b + "ln_1.bias"])
            qkv = F.linear(h, p[b + "attn.in_proj_weight"], p[b + "attn.in_proj_bias"])
            q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=s["causal"])
            a = a.transpose(1, 2).reshape(batch, length, width)
            a = F.linear(a, p[b + "attn.out_proj.weight"], p[b + "attn.out_proj.bias"])
            x = x + (a * p[b + "ls_1.gamma"] if s["layer_scale"] else a)
            h = F.layer_norm(x, (width,), p[b + "ln_2.weight"], p[b + "ln_2.bias"])
            h = F.linear(act(F.linear(h, p[b + "mlp.c_fc.weight"], p[b + "mlp.c_fc.bias"])),
                         p[b + "mlp.c_proj.weight"], p[b + "mlp.c_proj.bias"])
            x = x + (h * p[b + "ls_2.gamma"] if s["layer_scale"] else h)
        x = F.layer_norm(x, (width,), p["ln_final.weight"], p["ln_final.bias"])
        rows = torch.arange(batch, device=x.device)
        if pos is not None:
            x = x[rows, pos]
        elif pool == "argmax":
            x = x[rows, tokens.argmax(dim=-1)]
        elif pool == "eos":
            x = x[rows, (tokens == s["eos_id"]).int().argmax(dim=-1)]
        elif pool == "first":
            x = x[:, 0]
        elif pool == "last":
            x = x[:, -1]
        else:
            raise TaxamapError("text_cfg.pool_type 'none' gives one vector per token, not per prompt; "
                               "use taxamap.models.clip.load_clip for this model")
        if s["projection"] == "matrix":
            x = x @ p["text_projection"]
        elif s["projection"] == "linear":
            x = F.linear(x, p["text_projection.weight"], p["text_projection.bias"])
        return F.normalize(x, dim=-1)

    __call__ = forward

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """int64 (B, L) token ids (NumPy) -> float32 (B, embed_dim) NumPy rows."""
        import torch

        device = next(iter(self.state.values())).device
        with torch.inference_mode():
            return self.forward(torch.from_numpy(ids).to(device)).float().cpu().numpy()


@dataclass(frozen=True)
class CpuDevice:
    """``.device`` of a NumPy-backed encoder: reads like ``torch.device("cpu")`` (``.type``,
    ``str``) without importing torch."""

    type: str = "cpu"
    index: None = None

    def __str__(self) -> str:
        return self.type


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(np.square(centred), axis=-1, keepdims=True)
    return centred / np.sqrt(var + np.float32(_LN_EPS)) * weight + bias


def _linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    # ``weight.T`` is a view: BLAS reads it transposed, no copy.
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


@lru_cache(maxsize=1)
def _erf():
    """A vectorised exact erf: SciPy's ufunc, else the standard library's applied per element
    (slow but exact; an approximate erf would move embeddings away from open_clip's)."""
    try:
        from scipy.special import erf
    except ImportError:  # scipy is a taxamap dependency; keep results exact without it
        import math

        scalar = np.frompyfunc(math.erf, 1, 1)
        return lambda x: scalar(x).astype(np.float32)
    return erf


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as ``torch.nn.GELU()``: x * (1 + erf(x / sqrt 2)) / 2."""
    out = _erf()(x * np.float32(1.0 / np.sqrt(2.0))).astype(np.float32, copy=False)
    out += 1.0
    out *= 0.5
    out *= x
    return out


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    """open_clip's QuickGELU: x * sigmoid(1.702 x)."""
    with np.errstate(over="ignore"):  # exp overflows to inf for very negative x: the result is -0
        return x / (1.0 + np.exp(np.float32(-1.702) * x))


def _pool_positions(tokens: np.ndarray, spec: dict) -> np.ndarray | None:
    """Per row, the token position the pooled vector is read from (None for "last"/"none")."""
    pool = spec["pool_type"]
    if pool == "argmax":
        return tokens.argmax(axis=-1)
    if pool == "eos":
        return (tokens == spec["eos_id"]).argmax(axis=-1)
    if pool == "first":
        return np.zeros(tokens.shape[0], dtype=np.int64)
    return None


class NumpyTextTower:
    """The same forward pass as :class:`TextTower`, in float32 NumPy: CPU only, and no torch
    import (which costs more than embedding a prompt)."""

    def __init__(self, spec: dict, state: dict):
        self.spec = spec
        self.state = state

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """int64 (B, L) token ids -> float32 (B, embed_dim) unit-norm embeddings."""
        s, p = self.spec, self.state
        tokens = np.asarray(tokens)
        width, heads = s["width"], s["heads"]
        head_dim = width // heads
        pool = s["pool_type"]
        pos = _pool_positions(tokens, s)
        if s["causal"] and pos is not None:
            # Causal attention: positions after the pooled token (padding) cannot change it.
            length = int(pos.max()) + 1
        else:
            length = tokens.shape[1]
        batch = tokens.shape[0]
        # Rows are (prompt, position) pairs, so every Linear is one 2-D GEMM.
        x = np.take(p["token_embedding.weight"], tokens[:, :length].reshape(-1), axis=0)
        x = np.asarray(x, dtype=np.float32)
        if isinstance(p["token_embedding.weight"], np.memmap):  # not flushed at load
            x[np.abs(x) < np.finfo(np.float32).tiny] = 0
        x = (x.reshape(batch, length, width) + p["positional_embedding"][:length]).reshape(-1, width)
        if s["causal"]:
            mask = np.triu(np.full((length, length), -np.inf, np.float32), k=1)
        scale = np.float32(1.0 / np.sqrt(head_dim))
        act = _quick_gelu if s["quick_gelu"] else _gelu
        for i in range(s["layers"]):
            b = f"transformer.resblocks.{i}."
            h = _layer_norm(x, p[b + "ln_1.weight"], p[b + "ln_1.bias"])
            qkv = _linear(h, p[b + "attn.in_proj_weight"], p[b + "attn.in_proj_bias"])
            q, k, v = qkv.reshape(batch, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            scores = (q * scale) @ k.transpose(0, 1, 3, 2)  # (B, heads, L, L)
            if s["causal"]:
                scores += mask
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            a = (scores @ v).transpose(0, 2, 1, 3).reshape(-1, width)
            a = _linear(a, p[b + "attn.out_proj.weight"], p[b + "attn.out_proj.bias"])
            x = x + (a * p[b + "ls_1.gamma"] if s["layer_scale"] else a)
            h = _layer_norm(x, p[b + "ln_2.weight"], p[b + "ln_2.bias"])
            h = act(_linear(h, p[b + "mlp.c_fc.weight"], p[b + "mlp.c_fc.bias"]))
            h = _linear(h, p[b + "mlp.c_proj.weight"], p[b + "mlp.c_proj.bias"])
            x = x + (h * p[b + "ls_2.gamma"] if s["layer_scale"] else h)
        x = x.reshape(batch, length, width)
        rows = np.arange(batch)
        if pos is not None:
            x = x[rows, pos]
        elif pool == "last":
            x = x[:, -1]
        else:
            raise TaxamapError("text_cfg.pool_type 'none' gives one vector per token, not per prompt; "
                               "use taxamap.models.clip.load_clip for this model")
        # LayerNorm is per token, so applying it after pooling gives the same vectors, cheaper.
        x = _layer_norm(x, p["ln_final.weight"], p["ln_final.bias"])
        if s["projection"] == "matrix":
            x = x @ p["text_projection"]
        elif s["projection"] == "linear":
            x = _linear(x, p["text_projection.weight"], p["text_projection.bias"])
        x = x.astype(np.float32, copy=False)
        norms = np.linalg.norm(x, axis=-1, keepdims=True)
        return x / np.maximum(norms, np.float32(1e-12))

    __call__ = forward

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """:meth:`forward`, with BLAS on one thread for small batches (see :func:`_one_blas_thread`)."""
        if ids.shape[0] * ids.shape[1] <= _SMALL_BATCH_ROWS:
            with _one_blas_thread():
                return self.forward(ids)
        return self.forward(ids)


#: Token rows (prompts x positions) up to which BLAS runs on one thread.
_SMALL_BATCH_ROWS = 256


@lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    try:
        return ThreadpoolController()
    except Exception:  # an unusual BLAS build it cannot introspect: leave threads as they are
        return None


def _one_blas_thread():
    """Context: BLAS limited to one thread (via threadpoolctl when installed).

    A few prompts make ~70 small GEMMs (tens of rows each). Split over threads, each GEMM waits for
    its slowest thread; on a CPU busy with other processes a descheduled thread stalls every one
    of them (measured on a loaded 2-core machine: median 0.12 s, worst 1.6 s per prompt with two
    threads, 0.03 s steady with one)."""
    import contextlib

    controller = _blas_controller()
    if controller is None:
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


#: :meth:`TextEncoder.encode_text` tokenizes this many batches of prompts at a time.
TOKENIZE_BATCHES = 16


class TextEncoder:
    """Prompt embeddings in TaxaBind's shared space (float32, unit-norm rows), open_clip-free."""

    def __init__(self, tower: TextTower | NumpyTextTower, tokenizer: ClipTokenizer, ref: str, device,
                 batch_size: int = 256):
        self.tower = tower
        self.tokenizer = tokenizer
        self.ref = ref
        self.device = device
        self.backend = "numpy" if isinstance(tower, NumpyTextTower) else "torch"
        self.embed_dim = int(tower.spec["embed_dim"])
        self.batch_size = max(1, int(batch_size))

    def __repr__(self) -> str:
        return f"TextEncoder({self.ref}, device={self.device}, backend={self.backend})"

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return self.tokenizer.tokenize(list(prompts))

    def encode_text(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Embed prompts (plain seven-rank strings) -> float32 (N, embed_dim), unit-norm rows."""
        from taxamap.models.autocast import normalize_rows

        prompts = check_prompts(prompts)
        if not prompts:
            return np.zeros((0, self.embed_dim), np.float32)
        out = np.empty((len(prompts), self.embed_dim), np.float32)
        # Tokenized a chunk at a time, so the token ids held stay bounded however many prompts.
        chunk = TOKENIZE_BATCHES * self.batch_size
        for first in range(0, len(prompts), chunk):
            ids = self.tokenize(prompts[first:first + chunk])
            # Batch prompts of similar token length together: the tower drops the padding after
            # the longest prompt of a batch, so a few long prompts do not slow down the others.
            order = np.argsort(ids.argmax(axis=1), kind="stable")
            for start in range(0, len(ids), self.batch_size):
                rows = order[start:start + self.batch_size]
                out[first + rows] = self.tower.embed(ids[rows])
        return normalize_rows(out)

    encode = encode_text


def _pick_backend(backend: str, device) -> str:
    if backend not in BACKENDS:
        raise TaxamapError(f"unknown text backend {backend!r}; use one of {', '.join(BACKENDS)}")
    name = "auto" if device is None else str(device).lower()
    if backend == "auto":
        # A prompt is tens of milliseconds of CPU work; importing torch costs 1-2 s, so "auto"
        # stays with NumPy unless this process has imported torch already (the web app does, to
        # score its cells): then torch's kernels come free, 29 vs 68 ms a prompt for a
        # ViT-B/16-size tower on 2 cores, the same vectors to ~2e-7. "auto" stays on the CPU on
        # purpose: a GPU only pays off for large prompt batches, so ask for it by name.
        if name not in ("cpu", "auto"):
            return "torch"
        return "torch" if "torch" in sys.modules else "numpy"
    if backend == "numpy" and name not in ("cpu", "auto"):
        raise TaxamapError(f"the numpy text backend runs on the CPU only, not {device}; "
                           "use backend='torch' or device='cpu'")
    return backend


def load_text_encoder(
    models_dir: str | os.PathLike | None = None,
    device="cpu",
    config: dict | None = None,
    batch_size: int = 256,
    backend: str = "auto",
) -> TextEncoder:
    """Load TaxaBind's CLIP text encoder from the clip repo's files, without open_clip.

    Same file resolution as :func:`taxamap.models.clip.load_clip` (so ``.ref`` is the same);
    ``config`` is the TaxaBind entry config (read when None). ``backend``: ``"numpy"`` (CPU, never
    imports torch), ``"torch"`` (any device), or ``"auto"``: numpy when ``device`` is ``"cpu"`` or
    ``"auto"``/None, torch otherwise. Raises TaxamapError for configs it does not reproduce
    exactly, so callers can fall back to ``load_clip``.
    """
    chosen = _pick_backend(backend, device)
    if config is None:
        config, _ = hub.load_config(models_dir)
    repo_id = hub.encoder_repo(config, CLIP_CONFIG_KEY)
    repo = hub.resolve(repo_id, [CONFIG_FILE, WEIGHT_FILES], models_dir=models_dir)
    config_path = repo.file(CONFIG_FILE)
    spec = text_spec(hub.read_json(config_path), where=str(config_path))
    tokenizer = get_tokenizer(spec["context_length"], spec["clean"], spec["special_tokens"])
    if tokenizer.vocab_size > spec["vocab_size"]:
        raise TaxamapError(
            f"{config_path}: text vocab_size {spec['vocab_size']} is smaller than the CLIP tokenizer's "
            f"{tokenizer.vocab_size}; the model does not use open_clip's default tokenizer"
        )
    state = load_text_weights(repo.file(WEIGHT_FILES[0]), spec, backend=chosen)
    if chosen == "numpy":
        return TextEncoder(NumpyTextTower(spec, state), tokenizer, ref=repo.ref, device=CpuDevice(),
                           batch_size=batch_size)
    from taxamap.models.autocast import resolve_device

    dev = resolve_device(device)
    tower = TextTower(spec, state).to(dev)
    return TextEncoder(tower, tokenizer, ref=repo.ref, device=dev, batch_size=batch_size)
