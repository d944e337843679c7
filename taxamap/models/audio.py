"""TaxaBind's audio encoder (``MVRL/ecosound``): ``transformers.ClapAudioModelWithProjection``.

Input conventions, as TaxaBind trained (TAXABIND.md): decode, average the channels to mono, resample
to 48 kHz, then the CLAP feature extractor of ``laion/clap-htsat-fused`` (log-mel, 10 s, "repeatpad"
padding, "fusion" truncation). The extractor is built from that repo's ``preprocessor_config.json``
and called with transformers 5's signature (``raw_speech=``, ``max_length=`` in samples; rshf's
``audios=`` and ``max_length_s=`` are refused or silently ignored there).

Two things the extractor does at random are pinned here so that a query is reproducible:

* TaxaBind called the processor one clip at a time. Under "fusion", a batch in which no clip is
  longer than 10 s gets one clip, chosen at random, flagged ``is_longer``; with one clip per call
  that clip is always chosen, so every training clip went through the model's fusion branch. We
  call the extractor per clip too, which reproduces that flag exactly and keeps a clip's embedding
  independent of the other clips in its batch.
* Clips longer than 10 s are summarised by three random 10 s crops plus a shrunk whole-clip mel.
  The crops are drawn with a fixed seed (the global NumPy RNG state is saved and restored around
  the call), so the same file always gives the same embedding.

Decoding uses ``soundfile`` (libsndfile): WAV, FLAC, OGG/Vorbis/Opus, and MP3 with libsndfile >= 1.1
(the PyPI wheels bundle 1.2). Resampling is a polyphase FIR (``scipy.signal.resample_poly``).
TaxaBind resampled with ``torchaudio.functional.resample`` (Hann-windowed sinc); the two filters
differ only near the source's Nyquist frequency: on a chirp plus white noise at 16-44.1 kHz the
48 kHz outputs differed by 1.4 % RMS, and the tiny test model's embeddings by cosine >= 0.998.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.models import hub
from taxamap.models.autocast import autocast, normalize_rows, resolve_device, resolve_dtype

#: The TaxaBind config keys naming the audio encoder's repo and its feature extractor's.
CONFIG_KEY = "audio_encoder"
PROCESSOR_CONFIG_KEY = "audio_processor"

log = logging.getLogger(__name__)

MODEL_FILES = ["config.json", "model.safetensors"]
PROCESSOR_FILES = ["preprocessor_config.json"]

#: File types named in error messages (libsndfile may read more).
FORMATS = "WAV, FLAC, OGG (Vorbis/Opus) or MP3"

#: Longer recordings are refused rather than decoded into gigabytes of memory; "fusion" squeezes the
#: whole clip into one 10 s mel anyway, so a query should be a short excerpt.
MAX_SECONDS = 3600.0

#: Sample rates a recording may declare (telephone audio is 8 kHz, ultrasonic bat detectors record
#: up to 768 kHz). A header claiming 1 Hz for 3,000 s passes the duration check but would be
#: resampled x48,000: refused before anything is decoded.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 1_000_000

#: Most channels a recording may have (third-order ambisonics has 16, 64-channel arrays exist);
#: the channels are averaged to mono anyway.
MAX_CHANNELS = 64

#: Work budget per second of :data:`MAX_SECONDS` (or of ``load_audio``'s ``max_seconds``), in
#: samples: the decoded samples (frames x channels) and the samples after resampling are each
#: bounded by ``max_seconds`` of 48 kHz stereo (an hour: 346 million, 1.4 GB of float32), checked
#: from the header before anything is allocated.
SAMPLES_PER_SECOND = 2 * 48_000

#: Seed for the extractor's random crops of clips longer than ``max_length``.
CROP_SEED = 0

_PADDINGS = ("repeatpad", "repeat", "pad")
_TRUNCATIONS = ("fusion", "rand_trunc")

#: Buffers the model rebuilds or never reads in eval mode: a checkpoint may lack them.
_REBUILT_SUFFIXES = ("relative_position_index", "num_batches_tracked", "position_ids")
#: Keys of a full ClapModel that the audio tower does not use.
_TEXT_PREFIXES = ("text_model.", "text_projection.", "logit_scale_a", "logit_scale_t")


# --------------------------------------------------------------------------------------------
# Decoding and resampling
# --------------------------------------------------------------------------------------------


def load_audio(path: str | os.PathLike, target_rate: int | None = None, *,
               max_seconds: float = MAX_SECONDS) -> tuple[np.ndarray, int]:
    """Decode an audio file to float32 mono (the mean over its channels) and its sample rate.

    With ``target_rate`` the waveform is resampled to it and that rate is returned. The work is
    bounded from the header before anything is decoded: at most ``max_seconds`` long, sample
    rate and channels in range (:data:`MIN_SAMPLE_RATE`, :data:`MAX_CHANNELS`), decoded and
    resampled samples within ``max_seconds`` x :data:`SAMPLES_PER_SECOND`. Missing, corrupt,
    empty, unsupported or oversized files raise a one-line :class:`TaxamapError`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TaxamapError(f"audio file {path} not found; give the path of a {FORMATS} file")
    if not path.is_file():
        raise TaxamapError(f"{path} is not a file; give the path of a {FORMATS} file")
    try:
        import soundfile as sf
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise TaxamapError(
            f"reading audio needs the 'soundfile' package: pip install soundfile ({exc})"
        ) from exc

    try:
        check_audio(path, target_rate, max_seconds=max_seconds)
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except TaxamapError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError, EOFError) as exc:
        raise TaxamapError(_decode_failure(path, exc, sf)) from exc
    if data.shape[0] == 0:
        raise TaxamapError(f"{path} holds no audio samples; give a recording of at least a second")
    if not np.isfinite(data).all():
        raise TaxamapError(f"{path} holds NaN or infinite samples; the file is damaged, export it again")
    mono = _mix_down(data)  # a file's layout is (frames, channels) whatever their counts
    del data
    if target_rate is not None and int(target_rate) != int(rate):
        return resample(mono, int(rate), int(target_rate)), int(target_rate)
    return mono, int(rate)


def check_audio(path: str | os.PathLike, target_rate: int | None = None, *,
                max_seconds: float = MAX_SECONDS):
    """The header of an audio file (``soundfile.info``), read without decoding a sample;
    TaxamapError when it declares more work than :func:`load_audio` with these arguments allows
    (a caller may bound it tighter than ``load_audio``'s defaults this way)."""
    import soundfile as sf

    info = sf.info(str(path))
    channels, rate, frames = int(info.channels), int(info.samplerate), int(info.frames)
    if not 1 <= channels <= MAX_CHANNELS:
        raise TaxamapError(
            f"{path} has {channels:,} channels; taxamap reads recordings of up to {MAX_CHANNELS} "
            "channels (it averages them to mono): mix it down to mono or stereo first")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise TaxamapError(
            f"{path} declares a sample rate of {rate:,} Hz; recordings are sampled at "
            f"{MIN_SAMPLE_RATE:,} Hz to {MAX_SAMPLE_RATE:,} Hz (usually 44,100 or 48,000): the "
            "file is damaged or mislabelled, export it again")
    if frames <= 0:
        return info
    seconds = frames / rate
    if seconds > max_seconds:
        raise TaxamapError(
            f"{path} is {_duration(seconds)} long; taxamap takes recordings of up to "
            f"{_duration(max_seconds)}: cut a shorter excerpt (TaxaBind embeds 10 s, longer "
            "clips are squeezed into 10 s)")
    budget = max_seconds * SAMPLES_PER_SECOND
    resampled = math.ceil(frames * (target_rate or rate) / rate)
    if frames * channels > budget or resampled > budget:
        raise TaxamapError(
            f"{path} is {_duration(seconds)} of {channels} channels at {rate:,} Hz, more samples "
            f"than taxamap decodes for {_duration(max_seconds)} of audio: cut a shorter excerpt or "
            "mix it down to mono")
    return info


def _duration(seconds: float) -> str:
    return f"{seconds / 60:,.0f} minutes" if seconds >= 120 else f"{seconds:,.0f} s"


def _decode_failure(path: Path, exc: Exception, sf) -> str:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if path.suffix.lower() == ".mp3" and "MP3" not in sf.available_formats():
        return (
            f"cannot decode {path}: this libsndfile ({sf.__libsndfile_version__}) has no MP3 support; "
            "upgrade it (pip install -U soundfile bundles libsndfile >= 1.1) or convert the file "
            "to WAV or FLAC"
        )
    return f"cannot decode audio {path} ({detail}); give an undamaged {FORMATS} file"


def to_mono(data: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) samples -> float32 mono, the mean over channels."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 1:
        return data
    if data.ndim != 2:
        raise TaxamapError(f"audio must be (frames,) or (frames, channels), not shape {data.shape}")
    if data.shape[1] > data.shape[0]:
        raise TaxamapError(
            f"audio of shape {data.shape} has more channels than frames; pass (frames, channels), "
            "e.g. transpose a (channels, frames) array"
        )
    return _mix_down(data)


def _mix_down(data: np.ndarray) -> np.ndarray:
    """(frames, channels) float32 -> (frames,), the mean over channels."""
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0].copy()


def resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample mono ``waveform`` from ``rate`` to ``target`` Hz with a polyphase anti-aliasing
    filter; the result has ``ceil(len * target / rate)`` samples."""
    from scipy.signal import resample_poly

    rate, target = int(rate), int(target)
    if rate <= 0 or target <= 0:
        raise TaxamapError(f"sample rates must be positive, not {rate} -> {target}")
    waveform = np.asarray(waveform, dtype=np.float32)
    if rate == target:
        return waveform
    g = math.gcd(rate, target)
    out = resample_poly(waveform.astype(np.float64), target // g, rate // g)
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded_numpy(seed: int):
    """Run with the global NumPy RNG seeded (the extractor draws from it), then put it back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class AudioEncoder:
    """Clips ``(waveform, sample_rate)`` -> float32 (N, 512) unit-norm embeddings."""

    def __init__(self, model, extractor, ref: str, processor_ref: str, device, dtype=None, *,
                 max_length: int, padding: str, truncation: str, batch_size: int = 8,
                 embed_dim: int = 512):
        self.model = model
        self.extractor = extractor
        self.ref = ref
        self.processor_ref = processor_ref
        self.device = device
        self.dtype = dtype
        self.sample_rate = int(extractor.sampling_rate)
        self.max_length = int(max_length)
        self.padding = padding
        self.truncation = truncation
        self.batch_size = int(batch_size)
        self.embed_dim = int(embed_dim)

    def __repr__(self) -> str:
        return (f"AudioEncoder({self.ref}, processor={self.processor_ref}, device={self.device}, "
                f"dtype={self.dtype or 'float32'})")

    @property
    def refs(self) -> list[str]:
        """Every repo this encoder was built from (model, then feature extractor)."""
        return [self.ref, self.processor_ref]

    def prepare(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """A clip as the extractor wants it: finite float32 mono at the extractor's rate."""
        wave = to_mono(waveform)
        if wave.size == 0:
            raise TaxamapError("an audio clip has no samples; give a recording of at least a second")
        if not np.isfinite(wave).all():
            raise TaxamapError("an audio clip holds NaN or infinite samples; the recording is damaged")
        return resample(wave, int(sample_rate), self.sample_rate)

    def features(self, clips: Iterable[tuple[np.ndarray, int]]) -> dict:
        """CLAP inputs for ``clips``: ``input_features`` (N, 4 or 1, frames, mels) and
        ``is_longer`` (N, 1) torch tensors, one extractor call per clip (see the module notes)."""
        import torch

        feats, longer = [], []
        for item in clips:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TaxamapError("audio clips must be (waveform, sample_rate) pairs")
            wave = self.prepare(item[0], item[1])
            with _seeded_numpy(CROP_SEED):
                out = self.extractor(
                    raw_speech=wave,
                    sampling_rate=self.sample_rate,
                    max_length=self.max_length,
                    padding=self.padding,
                    truncation=self.truncation,
                    return_tensors="pt",
                )
            feats.append(out["input_features"].float())
            longer.append(out["is_longer"].bool())
        if not feats:
            raise TaxamapError("no audio clips to embed")
        return {"input_features": torch.cat(feats), "is_longer": torch.cat(longer)}

    def encode(self, clips: Sequence[tuple[np.ndarray, int]], batch_size: int | None = None) -> np.ndarray:
        """Embed ``(waveform, sample_rate)`` clips; waveforms may be mono or (frames, channels)."""
        clips = list(clips)
        if not clips:
            return np.zeros((0, self.embed_dim), np.float32)
        step = int(batch_size or self.batch_size)
        if step < 1:
            raise TaxamapError(f"batch size must be at least 1, not {step}")
        return np.concatenate([
            self.encode_features(self.features(clips[start:start + step]))
            for start in range(0, len(clips), step)
        ])

    def encode_features(self, inputs: dict) -> np.ndarray:
        """Embed extractor output (:meth:`features`) in one forward pass."""
        import torch

        kwargs = {"input_features": inputs["input_features"].to(self.device)}
        if getattr(self.model.config, "enable_fusion", False):
            kwargs["is_longer"] = inputs["is_longer"].to(self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            embeds = self.model(**kwargs).audio_embeds
        return normalize_rows(embeds.float().cpu().numpy())

    def encode_file(self, path: str | os.PathLike) -> np.ndarray:
        """Embed one audio file: (512,) float32, unit norm."""
        wave, rate = load_audio(path, target_rate=self.sample_rate)
        return self.encode([(wave, rate)])[0]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def audio_config(data: dict, path: Path):
    """A ``ClapAudioConfig`` from a repo's config.json: a ``clap_audio_model`` config, or a full
    ``clap`` config whose ``audio_config`` is used (its top-level projection settings win, as in
    ``ClapConfig``). No network."""
    from transformers import ClapAudioConfig

    data = hub.tower_settings(data, path, full="clap", part="audio_config",
                              tower="clap_audio_model",
                              lifted=("projection_dim", "projection_hidden_act"), override=True)
    try:
        return ClapAudioConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        msg = " ".join(str(exc).split())
        raise TaxamapError(f"cannot read the CLAP audio config {path}: {msg}") from exc


def _fit_state(state: dict, own: dict) -> dict:
    """Bring a checkpoint's keys to ClapAudioModelWithProjection's: strip a wrapper prefix
    (``model.``, as a Lightning module saves), drop a full ClapModel's text tower."""
    for prefix in ("model.", "module."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(_TEXT_PREFIXES)}


def load_state_strict(model, state: dict, weights: Path) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key is one TaxamapError
    naming the first few, never a silently half-random model."""
    own = model.state_dict()
    state = _fit_state(state, own)
    hub.check_state(own, state, weights, _REBUILT_SUFFIXES)
    state = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(state, strict=False)


def load_extractor(path: Path):
    """A ``ClapFeatureExtractor`` from a ``preprocessor_config.json``, no network."""
    from transformers import ClapFeatureExtractor

    data = hub.read_json(path)
    kind = data.get("feature_extractor_type")
    if kind not in (None, "ClapFeatureExtractor"):
        raise TaxamapError(f"{path} configures a {kind}, expected ClapFeatureExtractor")
    try:
        return ClapFeatureExtractor.from_dict(data)
    except (TypeError, ValueError) as exc:
        msg = " ".join(str(exc).split())
        raise TaxamapError(f"cannot read the CLAP feature extractor config {path}: {msg}") from exc


def _processor_repo(config: dict) -> str:
    # rshf's TaxaBindConfig names the processor 'get_audio_processor'; taxamap's key is
    # 'audio_processor'. Either one set in the user's config wins over the default.
    named = config.get("get_audio_processor")
    return hub.strip_hub_prefix(str(named)) if named else hub.encoder_repo(config, PROCESSOR_CONFIG_KEY)


def model_rate(config: dict) -> int:
    """The sample rate (Hz) recordings are resampled to for the encoder, from the TaxaBind config
    (no model loaded: a file can be decoded and resampled before the encoder loads)."""
    return int(config.get("audio_sample_rate") or hub.DEFAULT_CONFIG["audio_sample_rate"])


def _settings(config: dict, extractor, fusion: bool, repo_id: str) -> tuple[int, str, str]:
    """(max_length in samples, padding, truncation) from the TaxaBind config, checked against the
    extractor and the model."""
    defaults = hub.DEFAULT_CONFIG
    rate = model_rate(config)
    if rate != int(extractor.sampling_rate):
        raise TaxamapError(
            f"the TaxaBind config resamples audio to {rate} Hz but the CLAP feature extractor "
            f"expects {extractor.sampling_rate} Hz; the config and the processor do not belong together"
        )
    seconds = float(config.get("audio_max_length_s") or defaults["audio_max_length_s"])
    if seconds <= 0:
        raise TaxamapError(f"audio_max_length_s must be positive, not {seconds}")
    padding = config.get("audio_padding") or defaults["audio_padding"]
    if padding is True:  # the extractor's "use my default"
        padding = extractor.padding
    if padding not in _PADDINGS:
        raise TaxamapError(f"audio_padding {padding!r} is not one of {', '.join(_PADDINGS)}")
    truncation = config.get("audio_truncation") or defaults["audio_truncation"]
    if truncation is True:  # rshf's default; TaxaBind's training used "fusion"
        truncation = "fusion"
    if truncation not in _TRUNCATIONS:
        raise TaxamapError(f"audio_truncation {truncation!r} is not one of {', '.join(_TRUNCATIONS)}")
    if fusion != (truncation == "fusion"):
        raise TaxamapError(
            f"{repo_id} was built with enable_fusion={fusion} but the config asks for "
            f"{truncation!r} truncation; use 'fusion' exactly when the model has fusion enabled"
        )
    return int(round(seconds * extractor.sampling_rate)), padding, truncation


def load_audio_encoder(
    models_dir: str | os.PathLike | None = None,
    device="cpu",
    config: dict | None = None,
    dtype=None,
    batch_size: int = 8,
) -> AudioEncoder:
    """Load TaxaBind's audio encoder and its CLAP feature extractor.

    ``models_dir``: a models folder (else ``TAXAMAP_MODELS``, else the Hugging Face cache);
    ``config``: the TaxaBind entry config (read when None), naming the repos (``audio_encoder``,
    ``audio_processor``) and the audio settings; ``device``: "cpu", "cuda" or "auto"; ``dtype``:
    autocast dtype on CUDA (None = bf16 when supported); CPU always runs float32.
    """
    from transformers import ClapAudioModelWithProjection

    if config is None:
        config, _ = hub.load_config(models_dir)
    repo_id = hub.encoder_repo(config, CONFIG_KEY)
    repo = hub.resolve(repo_id, MODEL_FILES, models_dir=models_dir)
    proc_repo = hub.resolve(_processor_repo(config), PROCESSOR_FILES, models_dir=models_dir)

    config_path = repo.file("config.json")
    weights_path = repo.file("model.safetensors")
    acfg = audio_config(hub.read_json(config_path), config_path)
    extractor = load_extractor(proc_repo.file("preprocessor_config.json"))
    if int(extractor.feature_size) != int(acfg.num_mel_bins):
        raise TaxamapError(
            f"{proc_repo.repo_id} makes {extractor.feature_size} mel bins but {repo_id} expects "
            f"{acfg.num_mel_bins}; the processor and the model do not belong together"
        )
    max_length, padding, truncation = _settings(config, extractor, bool(acfg.enable_fusion), repo_id)

    try:
        model = ClapAudioModelWithProjection(acfg)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        raise TaxamapError(f"cannot build the CLAP audio model from {config_path}: {exc}") from exc
    state = hub.load_weights(weights_path)
    load_state_strict(model, state, weights_path)
    del state

    dev = resolve_device(device)
    model = model.to(dev).eval()
    return AudioEncoder(
        model=model,
        extractor=extractor,
        ref=repo.ref,
        processor_ref=proc_repo.ref,
        device=dev,
        dtype=resolve_dtype(dev, dtype),
        max_length=max_length,
        padding=padding,
        truncation=truncation,
        batch_size=batch_size,
        embed_dim=int(acfg.projection_dim),
    )


def embed_audio_query(
    path: str | os.PathLike,
    models_dir: str | os.PathLike | None = None,
    device="cpu",
    config: dict | None = None,
) -> tuple[np.ndarray, str]:
    """One audio file -> its unit-norm query embedding (512,) and the encoder's ``repo@revision``.

    The file is decoded first, so a bad file fails before any model is loaded.
    """
    wave, rate = load_audio(path)
    encoder = load_audio_encoder(models_dir=models_dir, device=device, config=config)
    return encoder.encode([(wave, rate)])[0], encoder.ref
