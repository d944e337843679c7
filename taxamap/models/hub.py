"""Resolve a model repo to local files: a models folder, else the Hugging Face cache/download.

This is the only place that touches the Hub. Every encoder loads through :func:`resolve`, so a
tiny checkpoint written in the released layout (tests) loads through exactly the code a real
checkpoint does.

Models folder layout (``--models DIR`` or ``TAXAMAP_MODELS``): ``DIR/<org>/<repo>/<file>`` with
exactly the files of that hub repo, e.g. ``DIR/MVRL/ecogeo/model.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from taxamap.errors import ModelFilesMissing, TaxamapError

log = logging.getLogger(__name__)

CONFIG_REPO = "MVRL/taxabind-config"

#: The published TaxaBind config (MVRL/taxabind-config/config.json). A key missing from the file
#: a user has means "use this default", never a crash.
DEFAULT_CONFIG: dict = {
    "clip": "hf-hub:MVRL/taxabind-vit-b-16",
    "location_encoder": "MVRL/ecogeo",
    "env_encoder": "MVRL/ecoclim",
    "sat_encoder": "MVRL/ecosat",
    "audio_encoder": "MVRL/ecosound",
    "audio_processor": "laion/clap-htsat-fused",
    "image_resize": 256,
    "image_crop": 224,
    "sat_resize": 256,
    "sat_crop": 224,
    "normalize_mean": [0.485, 0.456, 0.406],
    "normalize_std": [0.229, 0.224, 0.225],
    "audio_sample_rate": 48000,
    "audio_max_length_s": 10,
    "audio_padding": "repeatpad",
    "audio_truncation": "fusion",
}

#: Hub revisions used when downloading. "main" until a user pins a commit: set
#: ``TAXAMAP_REVISION_<ORG>_<NAME>`` (upper case, '-' and '.' as '_') to a commit hash. The commit
#: actually used is always read back from the cache and recorded in every output's tags.
DEFAULT_REVISION = "main"

#: A file entry is a name, or a tuple of alternatives tried in order (safetensors before .bin).
FileSpec = Union[str, Sequence[str]]

#: The files each published repo must provide.
REPO_FILES: dict[str, list[FileSpec]] = {
    CONFIG_REPO: ["config.json"],
    "MVRL/ecogeo": ["config.json", "model.safetensors"],
    "MVRL/ecoclim": ["config.json", "model.safetensors"],
    "MVRL/ecosat": ["config.json", "model.safetensors"],
    "MVRL/ecosound": ["config.json", "model.safetensors"],
    "MVRL/taxabind-vit-b-16": [
        "open_clip_config.json",
        ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    ],
    "laion/clap-htsat-fused": ["preprocessor_config.json"],
}

@dataclass(frozen=True)
class ResolvedRepo:
    """Local files of one repo. ``files`` maps each requested name (first alternative) to a path."""

    repo_id: str
    path: Path
    revision: str
    files: dict

    @property
    def ref(self) -> str:
        """``repo@revision`` as recorded in output tags."""
        return f"{self.repo_id}@{self.revision}"

    def file(self, name: str) -> Path:
        return self.files[name]


def models_dir_from_env(models_dir: str | os.PathLike | None = None) -> Path | None:
    """The models folder in effect: the argument, else ``TAXAMAP_MODELS``, else None."""
    chosen = models_dir if models_dir else os.environ.get("TAXAMAP_MODELS")
    return Path(chosen).expanduser() if chosen else None


def strip_hub_prefix(repo: str) -> str:
    return repo[len("hf-hub:"):] if repo.startswith("hf-hub:") else repo


def hf_offline() -> bool:
    """HF_HUB_OFFLINE, read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_cache_dir() -> str | None:
    """The Hugging Face hub cache in effect now: HF_HUB_CACHE, else HF_HOME/hub, else default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def revision_for(repo_id: str) -> str:
    env = "TAXAMAP_REVISION_" + "".join(c if c.isalnum() else "_" for c in repo_id).upper()
    return os.environ.get(env, DEFAULT_REVISION)


def _alternatives(spec: FileSpec) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


#: Seconds the one reachability probe of the Hub waits for a TCP connection (and DNS).
HUB_PROBE_TIMEOUT_S = 3.0

#: The probe's answer per endpoint, for this process: None (reachable) or why not.
_HUB_PROBES: dict[str, str | None] = {}

_TO_DOWNLOAD = ("either run 'taxamap models download DIR' on a connected machine and pass "
                "--models DIR (or set TAXAMAP_MODELS=DIR)")


def _missing_message(repo_id: str, missing: list[str], where: str, cache_hint: str) -> str:
    """One line: what is missing, where it was looked for, and the two ways to provide it."""
    return f"model files missing for {repo_id}: {', '.join(missing)} ({where}); {_TO_DOWNLOAD}, or {cache_hint}"


def _cache_hint() -> str:
    """How the Hugging Face cache would get the files, given the environment now."""
    if hf_offline():
        return ("unset HF_HUB_OFFLINE on a connected machine so they download into the Hugging "
                "Face cache")
    return ("connect to the internet so they download into the Hugging Face cache (or copy a cache "
            "filled on a connected machine to HF_HOME)")


def hub_endpoint() -> str:
    """The Hub URL downloads use: huggingface_hub's endpoint (HF_ENDPOINT, read at its import)."""
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except ImportError:  # pragma: no cover - a dependency of the package
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_unreachable(endpoint: str | None = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub (or the proxy in front of it) accepts a TCP connection, else why not.

    One short probe per endpoint and process, so a machine without a network learns it in a few
    seconds instead of huggingface_hub retrying every file for ~20 s. A Hub that accepts
    connections but then fails keeps huggingface_hub's own retries.
    """
    endpoint = endpoint or hub_endpoint()
    if endpoint not in _HUB_PROBES:
        _HUB_PROBES[endpoint] = _probe(endpoint, timeout)
    return _HUB_PROBES[endpoint]


def _probe(url: str, timeout: float) -> str | None:
    import socket
    import threading
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    # Behind a proxy the Hub is reached through it: probe the proxy instead.
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = proxied.hostname or host, proxied.port or 8080
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except socket.gaierror:
            outcome.append(f"cannot resolve {host}")
        except OSError as exc:
            outcome.append(f"{host}:{port}: {exc.strerror or exc.__class__.__name__}")

    # A thread bounds name resolution too, which has no timeout of its own.
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    if not outcome:
        return f"{host}:{port}: no answer within {timeout:g} s"
    log.debug("hub probe %s: %s", url, outcome[0] or "reachable")
    return outcome[0]


def resolve(
    repo_id: str,
    files: Sequence[FileSpec] | None = None,
    *,
    models_dir: str | os.PathLike | None = None,
    revision: str | None = None,
) -> ResolvedRepo:
    """Find ``files`` of ``repo_id`` locally, downloading into the HF cache if allowed.

    Raises :class:`ModelFilesMissing` (one line, says how to provide them) when they can't be had.
    """
    repo_id = strip_hub_prefix(repo_id)
    files = list(files if files is not None else REPO_FILES.get(repo_id, []))
    root = models_dir_from_env(models_dir)
    if root is not None:
        folder = root / repo_id
        found, missing = {}, []
        for spec in files:
            alts = _alternatives(spec)
            hit = next((folder / a for a in alts if (folder / a).is_file()), None)
            if hit is None:
                missing.append(" or ".join(alts))
            else:
                found[alts[0]] = hit
        if missing:
            raise ModelFilesMissing(_missing_message(
                repo_id, missing, f"looked in {folder}",
                "drop --models/TAXAMAP_MODELS to use the Hugging Face cache"))
        return ResolvedRepo(repo_id, folder, "local-" + fingerprint(found.values()), found)
    return _resolve_from_hub(repo_id, files, revision or revision_for(repo_id))


def _resolve_from_hub(repo_id: str, files: list[FileSpec], revision: str) -> ResolvedRepo:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise TaxamapError(f"huggingface_hub is required to download models: {exc}") from exc
    # Offline by choice, or the Hub is unreachable: only the cache can serve (and huggingface_hub
    # is not left to retry each file against a dead network).
    unreachable = None if hf_offline() else hub_unreachable()
    local_only = hf_offline() or unreachable is not None
    found, missing, last_error = {}, [], None
    for spec in files:
        alts = _alternatives(spec)
        hit = None
        for name in alts:
            try:
                hit = Path(
                    hf_hub_download(
                        repo_id,
                        name,
                        revision=revision,
                        cache_dir=hf_cache_dir(),
                        local_files_only=local_only,
                    )
                )
                break
            except (EntryNotFoundError, LocalEntryNotFoundError):
                continue
            except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
                raise TaxamapError(
                    f"Hugging Face repo {repo_id}@{revision} not found ({type(exc).__name__}); "
                    "check the repo name in the TaxaBind config or the TAXAMAP_REVISION_* setting"
                ) from exc
            except OSError as exc:  # network down, disk full...
                log.debug("download of %s/%s failed: %s", repo_id, name, exc)
                last_error = exc
                continue
        if hit is None:
            missing.append(" or ".join(alts))
        else:
            found[alts[0]] = hit
    if missing:
        if hf_offline():
            where = "HF_HUB_OFFLINE is set and they are not in the Hugging Face cache"
        elif unreachable is not None:
            where = (f"not in the Hugging Face cache; the Hugging Face Hub at {hub_endpoint()} "
                     f"cannot be reached: {unreachable}")
        else:
            reason = f": {' '.join(str(last_error).split())[:200]}" if last_error else ""
            where = f"not in the Hugging Face cache and the download failed{reason}"
        raise ModelFilesMissing(_missing_message(repo_id, missing, where, _cache_hint()))
    any_path = next(iter(found.values()))
    # .../snapshots/<commit>/<file>: the folder name is the exact commit used.
    commit = any_path.parent.name if any_path.parent.parent.name == "snapshots" else revision
    return ResolvedRepo(repo_id, any_path.parent, commit, found)


def fingerprint(paths) -> str:
    """A short content fingerprint of local files (size + first and last MiB), so stores made
    with one set of local weights are never reused with another."""
    import hashlib

    h = hashlib.sha1()
    for path in sorted(Path(p) for p in paths):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:12]


def load_config(models_dir: str | os.PathLike | None = None) -> tuple[dict, str]:
    """The TaxaBind entry config merged over :data:`DEFAULT_CONFIG`, and its ``repo@revision``.

    A config that cannot be found falls back to the defaults (they are the published values), so
    only the encoders' own files are required.
    """
    try:
        repo = resolve(CONFIG_REPO, models_dir=models_dir)
    except ModelFilesMissing:
        return dict(DEFAULT_CONFIG), f"{CONFIG_REPO}@defaults"
    try:
        data = json.loads(repo.file("config.json").read_text())
    except (OSError, ValueError) as exc:
        raise TaxamapError(f"cannot read {repo.file('config.json')}: {exc}") from exc
    if not isinstance(data, dict):
        raise TaxamapError(f"{repo.file('config.json')} is not a JSON object")
    merged = dict(DEFAULT_CONFIG)
    merged.update({k: v for k, v in data.items() if v is not None})
    return merged, repo.ref


def encoder_repo(config: dict, key: str) -> str:
    """Repo id of the encoder the TaxaBind config names under ``key`` (each encoder module's
    ``CONFIG_KEY``: "location_encoder", "sat_encoder", "clip", ...)."""
    return strip_hub_prefix(str(config.get(key) or DEFAULT_CONFIG[key]))


def read_json(path: Path) -> dict:
    """Read a JSON config file, as a one-line TaxamapError when it is unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TaxamapError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TaxamapError(f"model config {path} is not a JSON object")
    return data


def load_weights(path: Path) -> dict:
    """Load a state dict without executing pickled code: safetensors, or ``torch.load`` with
    ``weights_only=True`` for ``.pth``/``.bin``. Subnormal floats are flushed to zero (see
    :func:`flush_subnormals`)."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated files come in many exception types
        raise TaxamapError(f"cannot load weights {path}: {exc.__class__.__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise TaxamapError(f"{path} does not hold a state dict")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    flush_subnormals(state)
    return state


def tower_settings(data: dict, path, *, full: str, part: str, tower: str,
                   lifted: tuple[str, ...], override: bool) -> dict:
    """The settings of one tower from a repo's config.json ``data``: a ``tower`` config as it is,
    or the ``part`` section of a ``full`` model's config, with the top-level keys ``lifted`` into
    it (``override``: they win over the section's, else they only fill gaps). TaxamapError when
    the file describes another model."""
    if data.get("model_type") == full or part in data:
        sub = dict(data.get(part) or {})
        for key in lifted:
            if key in data and (override or key not in sub):
                sub[key] = data[key]
        data = sub
    elif data.get("model_type") not in (None, tower):
        raise TaxamapError(
            f"{path} describes a {data.get('model_type')!r} model, expected {tower}")
    return {k: v for k, v in data.items() if k not in ("architectures", "model_type")}


def check_state(own: dict, state: dict, weights, ignore_suffixes: tuple[str, ...] = (),
                config_name: str = "config.json") -> None:
    """Raise one TaxamapError when ``state`` (a checkpoint) does not fit ``own`` (a model's
    state dict, or {name: shape}): unexpected, missing or mis-shaped keys, the first few named. A
    half-random model is never loaded silently. Keys ending in ``ignore_suffixes`` (buffers a
    model rebuilds) pass; ``config_name`` is the repo file the model was built from."""
    def shape(value) -> tuple:
        return tuple(value) if isinstance(value, tuple) else tuple(value.shape)

    unexpected = [k for k in state if k not in own and not k.endswith(ignore_suffixes)]
    missing = [k for k in own if k not in state and not k.endswith(ignore_suffixes)]
    other = [k for k in own if k in state and shape(own[k]) != shape(state[k])]
    if not (missing or unexpected or other):
        return
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if other:
        k = other[0]
        parts.append(f"{len(other)} with other shapes (e.g. {k}: file {shape(state[k])} "
                     f"vs config {shape(own[k])})")
    raise TaxamapError(
        f"weights {weights} do not match its {config_name}: " + "; ".join(parts)
        + "; the repo's files are from different models or corrupt, download them again"
    )


def flush_subnormals(state: dict) -> int:
    """Zero subnormal floats in place and return how many there were.

    Subnormals make x86 CPU matmuls several times slower; at magnitudes below ~1e-38 they change
    no output a float32 model can represent. (GeoCLIP's location weights hold ~97 k of them.)
    """
    import torch

    count = 0
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            tiny = torch.finfo(value.dtype).tiny
            sub = (value != 0) & (value.abs() < tiny)
            n = int(sub.sum())
            if n:
                value[sub] = 0
                count += n
    if count:
        log.debug("flushed %d subnormal weights to zero", count)
    return count


def download_models(
    target: str | os.PathLike,
    repos: Sequence[str] | None = None,
) -> list[Path]:
    """Fill a models folder (``target/<org>/<repo>/``) from the Hub for an air-gapped machine."""
    from huggingface_hub import hf_hub_download

    target = Path(target).expanduser()
    repos = list(repos or REPO_FILES)
    unknown = [r for r in repos if r not in REPO_FILES]
    if unknown:
        raise TaxamapError(f"unknown repo {', '.join(unknown)}; choose from {', '.join(REPO_FILES)}")
    unreachable = hub_unreachable()
    if unreachable is not None:
        raise TaxamapError(f"the Hugging Face Hub at {hub_endpoint()} cannot be reached: {unreachable}; "
                           "run 'taxamap models download' on a machine with internet access and "
                           "copy the folder here")
    written = []
    for repo_id in repos:
        folder = target / repo_id
        folder.mkdir(parents=True, exist_ok=True)
        for spec in REPO_FILES.get(repo_id, []):
            alts = _alternatives(spec)
            last_exc = None
            for name in alts:
                try:
                    path = hf_hub_download(
                        repo_id, name, revision=revision_for(repo_id), local_dir=str(folder)
                    )
                    written.append(Path(path))
                    break
                except Exception as exc:  # try the next alternative
                    last_exc = exc
            else:
                raise TaxamapError(f"could not download {repo_id}/{' or '.join(alts)}: {last_exc}")
    return written
