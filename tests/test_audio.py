"""Audio query: decoding, mono mixdown, 48 kHz resampling, and the CLAP audio encoder
(MVRL/ecosound via transformers ClapAudioModelWithProjection + laion/clap-htsat-fused extractor)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from taxamap.errors import ModelFilesMissing, TaxamapError
from taxamap.models.audio import (
    embed_audio_query,
    load_audio,
    load_audio_encoder,
    resample,
)
from taxamap.models.hub import DEFAULT_CONFIG
from tests.helpers.tiny import write_repo

MODEL = "MVRL/ecosound"
PROCESSOR = "laion/clap-htsat-fused"
RATE = 22050
SECONDS = 3


def stereo(seconds: float = SECONDS, rate: int = RATE) -> np.ndarray:
    """(frames, 2): 440 Hz left, 660 Hz right, so the mixdown is a known sum of two sines."""
    t = np.arange(int(seconds * rate)) / rate
    left, right = np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)
    return (0.5 * np.stack([left, right], 1)).astype(np.float32)


def chirp(seconds: float, rate: int = 48000, f0: float = 300.0, f1: float = 6000.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (f0 + (f1 - f0) * t / (2 * seconds)) * t)).astype(np.float32)


def noise(seconds: float, seed: int, rate: int = 48000) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for repo in (MODEL, PROCESSOR, "MVRL/taxabind-config"):
        write_repo(root, repo)
    return root


@pytest.fixture(scope="module")
def enc(models):
    return load_audio_encoder(models)


@pytest.fixture(scope="module")
def sounds(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sounds")
    data = stereo()
    sf.write(folder / "clip.wav", data, RATE, subtype="FLOAT")
    # Integer samples, so that the lossless files hold exactly the same values.
    pcm = np.round(data * 32767).astype(np.int16)
    sf.write(folder / "clip16.wav", pcm, RATE, subtype="PCM_16")
    sf.write(folder / "clip.flac", pcm, RATE, subtype="PCM_16")
    sf.write(folder / "clip.ogg", data, RATE, format="OGG", subtype="VORBIS")
    sf.write(folder / "clip.mp3", data, RATE, format="MP3", subtype="MPEG_LAYER_III")
    return folder


# ---------------------------------------------------------------- decoding and resampling


def test_wav_mono_is_the_channel_mean(sounds):
    wave, rate = load_audio(sounds / "clip.wav")
    assert rate == RATE and wave.dtype == np.float32 and wave.ndim == 1
    np.testing.assert_array_equal(wave, stereo().mean(axis=1))


def test_resampled_to_48k_keeps_duration_and_pitch(sounds):
    wave, rate = load_audio(sounds / "clip.wav", target_rate=48000)
    assert rate == 48000 and wave.dtype == np.float32
    assert wave.shape == (SECONDS * 48000,)
    # The same two sines sampled at 48 kHz directly: the polyphase filter matches them to 2.5e-4
    # away from the edges; linear interpolation would be off by 1e-3.
    expected = stereo(rate=48000).mean(axis=1)
    inner = slice(4800, -4800)
    assert np.max(np.abs(wave[inner] - expected[inner])) < 5e-4
    spectrum = np.abs(np.fft.rfft(wave))
    freqs = np.fft.rfftfreq(wave.size, 1 / 48000)
    assert sorted(freqs[np.argsort(spectrum)[-2:]].round()) == [440.0, 660.0]


def test_resample_is_identity_at_the_same_rate():
    x = noise(0.5, seed=1)
    assert resample(x, 48000, 48000) is x or np.array_equal(resample(x, 48000, 48000), x)
    assert resample(x, 48000, 16000).shape == (8000,)


@pytest.mark.parametrize("name,tol", [("clip.flac", 0.0), ("clip.ogg", 0.02), ("clip.mp3", 0.02)])
def test_flac_ogg_mp3_decode_like_the_wav(sounds, name, tol):
    ref, _ = load_audio(sounds / "clip16.wav")
    wave, rate = load_audio(sounds / name)
    assert rate == RATE and wave.shape == ref.shape and wave.dtype == np.float32
    if tol == 0.0:
        np.testing.assert_array_equal(wave, ref)  # lossless
    else:
        assert np.corrcoef(wave, ref)[0, 1] > 1 - tol


def test_missing_corrupt_empty_and_unsupported_files(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + bytes(64))
    text = tmp_path / "notes.mp3"
    text.write_text("this is not audio at all\n" * 20)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), np.float32), 48000)
    cases = {
        tmp_path / "nope.wav": "not found",
        bad: "cannot decode",
        text: "cannot decode",
        empty: "no audio samples",
        tmp_path: "not a file",
    }
    for path, words in cases.items():
        with pytest.raises(TaxamapError) as info:
            load_audio(path)
        msg = str(info.value)
        assert words in msg and "\n" not in msg, msg


def test_non_finite_samples_are_refused(tmp_path):
    path = tmp_path / "nan.wav"
    data = noise(0.2, seed=2)
    data[100] = np.nan
    sf.write(path, data, 48000, subtype="FLOAT")
    with pytest.raises(TaxamapError, match="NaN"):
        load_audio(path)


def test_work_is_bounded_from_the_header_before_decoding(tmp_path):
    import tracemalloc

    bomb = tmp_path / "slow.wav"
    sf.write(bomb, np.zeros(3000, np.int16), 1)  # 3,000 s at 1 Hz: x48,000 to resample
    many = tmp_path / "many.wav"
    sf.write(many, np.zeros((10, 100), np.int16), 22050)
    tracemalloc.start()
    try:
        with pytest.raises(TaxamapError, match="sample rate of 1 Hz"):
            load_audio(bomb, target_rate=48000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    with pytest.raises(TaxamapError, match="has 100 channels.*mix it down") as info:
        load_audio(many)
    assert "transpose" not in str(info.value)
    four = tmp_path / "four.wav"  # 1 s, but 4 channels at 48 kHz: twice the samples of 1 s stereo
    sf.write(four, np.zeros((48000, 4), np.int16), 48000)
    with pytest.raises(TaxamapError, match="more samples than taxamap decodes for 1 s"):
        load_audio(four, max_seconds=1)
    low = tmp_path / "low.wav"  # 1 s at 1 kHz, resampled to 200 kHz
    sf.write(low, np.zeros(1000, np.int16), 1000)
    with pytest.raises(TaxamapError, match="more samples"):
        load_audio(low, target_rate=200_000, max_seconds=1)
    assert load_audio(low, target_rate=48_000, max_seconds=1)[0].shape == (48000,)
    two = tmp_path / "two.wav"
    sf.write(two, np.zeros(2000, np.int16), 1000)
    with pytest.raises(TaxamapError, match="2 s long; taxamap takes recordings of up to 1 s"):
        load_audio(two, max_seconds=1)


def test_a_file_with_few_frames_is_mixed_down(tmp_path):
    path = tmp_path / "short.wav"  # more channels than frames: a file's layout is never in doubt
    sf.write(path, np.full((3, 8), 0.25, np.float32), 8000, subtype="FLOAT")
    wave, rate = load_audio(path)
    np.testing.assert_array_equal(wave, np.full(3, 0.25, np.float32))


# ---------------------------------------------------------------- the encoder


def test_loads_through_the_resolver(enc):
    assert enc.ref.startswith(MODEL + "@local-")
    assert enc.processor_ref.startswith(PROCESSOR + "@local-")
    assert enc.refs == [enc.ref, enc.processor_ref]
    assert not enc.model.training
    assert enc.device.type == "cpu"
    fe = enc.extractor
    # The released laion/clap-htsat-fused preprocessor settings, via the models folder.
    assert (fe.sampling_rate, fe.feature_size, fe.hop_length, fe.fft_window_size) == (48000, 64, 480, 1024)
    assert (fe.frequency_min, fe.frequency_max) == (50, 14000)
    assert (enc.max_length, enc.padding, enc.truncation) == (480000, "repeatpad", "fusion")


def test_embeddings_unit_norm_deterministic_batch_independent(enc):
    clips = [(stereo(), RATE), (noise(2, seed=3), 48000), (chirp(4), 48000)]
    out = enc.encode(clips)
    assert out.shape == (3, 512) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(enc.encode(clips), out)
    one_by_one = np.concatenate([enc.encode([c]) for c in clips])
    np.testing.assert_allclose(one_by_one, out, atol=1e-5)
    np.testing.assert_allclose(enc.encode(clips, batch_size=2), out, atol=1e-5)
    sims = out @ out.T
    assert np.all(sims[np.triu_indices(3, 1)] < 0.99), sims  # distinct sounds, distinct vectors
    assert enc.encode([]).shape == (0, 512)


def test_stereo_and_rate_are_handled_inside_encode(enc):
    data = stereo()
    mono48 = resample(data.mean(axis=1), RATE, 48000)
    np.testing.assert_allclose(enc.encode([(data, RATE)]), enc.encode([(mono48, 48000)]), atol=1e-6)


def test_matches_transformers_own_loading_path(enc, models):
    """Independent reference: transformers' from_pretrained + the extractor called as TaxaBind did
    (one clip per call, 48 kHz, repeatpad, fusion)."""
    from transformers import ClapAudioModelWithProjection, ClapFeatureExtractor

    model = ClapAudioModelWithProjection.from_pretrained(str(models / MODEL)).eval()
    fe = ClapFeatureExtractor.from_pretrained(str(models / PROCESSOR))
    wave = chirp(3)
    inputs = fe(wave, sampling_rate=48000, padding="repeatpad", truncation="fusion", return_tensors="pt")
    assert bool(inputs["is_longer"].all())  # a single short clip is flagged, as in training
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(**inputs).audio_embeds, dim=-1).numpy()
    np.testing.assert_allclose(enc.encode([(wave, 48000)]), ref, atol=1e-5)


def test_long_clip_goes_through_fusion(enc):
    long = chirp(14)
    state = np.random.get_state()
    feats = enc.features([(long, 48000)])
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # caller's RNG untouched
    x = feats["input_features"]
    assert tuple(x.shape) == (1, 4, 1001, 64) and bool(feats["is_longer"][0, 0])
    # Channel 0 is the whole 14 s squeezed to 10 s, 1-3 are 10 s crops: all differ.
    assert not torch.allclose(x[0, 0], x[0, 1]) and not torch.allclose(x[0, 1], x[0, 3])
    short = enc.features([(chirp(3), 48000)])["input_features"]
    assert torch.equal(short[0, 0], short[0, 1]) and torch.equal(short[0, 0], short[0, 3])

    first = enc.encode([(long, 48000)])
    assert first.shape == (1, 512) and abs(np.linalg.norm(first) - 1) < 1e-5
    np.random.seed(123)  # whatever the caller's RNG holds, the crops are the same
    np.testing.assert_array_equal(enc.encode([(long, 48000)]), first)
    assert float((first @ enc.encode([(long[: 3 * 48000], 48000)]).T)[0, 0]) < 0.999


def test_bad_clips_are_taxamap_errors(enc):
    with pytest.raises(TaxamapError, match="no samples"):
        enc.encode([(np.zeros(0, np.float32), 48000)])
    with pytest.raises(TaxamapError, match="NaN"):
        enc.encode([(np.full(1000, np.nan, np.float32), 48000)])
    with pytest.raises(TaxamapError, match="transpose"):
        enc.encode([(stereo().T, RATE)])
    with pytest.raises(TaxamapError, match="pairs"):
        enc.encode([np.zeros(1000, np.float32)])


def test_embed_audio_query(models, sounds, enc):
    vec, ref = embed_audio_query(sounds / "clip.flac", models_dir=models)
    assert vec.shape == (512,) and vec.dtype == np.float32 and abs(np.linalg.norm(vec) - 1) < 1e-5
    assert ref == enc.ref
    wave, rate = load_audio(sounds / "clip.flac")
    np.testing.assert_allclose(vec, enc.encode([(wave, rate)])[0], atol=1e-6)
    np.testing.assert_allclose(enc.encode_file(sounds / "clip.flac"), vec, atol=1e-6)


def test_bad_file_fails_before_any_model_is_needed(tmp_path):
    with pytest.raises(TaxamapError, match="not found") as info:
        embed_audio_query(tmp_path / "missing.ogg", models_dir=tmp_path / "empty-models")
    assert not isinstance(info.value, ModelFilesMissing)


# ---------------------------------------------------------------- repo layouts and failures


def copy_models(models: Path, dest: Path) -> Path:
    shutil.copytree(models, dest)
    return dest


@pytest.mark.parametrize("repo,name", [(MODEL, "model.safetensors"), (PROCESSOR, "preprocessor_config.json")])
def test_missing_files_are_model_files_missing(models, tmp_path, repo, name):
    root = copy_models(models, tmp_path / "m")
    (root / repo / name).unlink()
    with pytest.raises(ModelFilesMissing) as info:
        load_audio_encoder(root)
    assert name in str(info.value) and repo in str(info.value)


def test_full_clap_config_layout_loads_the_same(models, tmp_path, enc):
    """A config.json saved from a full ClapModel (audio_config nested) builds the same tower."""
    from transformers import ClapConfig

    root = copy_models(models, tmp_path / "m")
    path = root / MODEL / "config.json"
    audio = json.loads(path.read_text())
    full = ClapConfig(audio_config=audio, projection_dim=audio["projection_dim"]).to_dict()
    path.write_text(json.dumps(full))
    other = load_audio_encoder(root)
    clip = [(chirp(2), 48000)]
    np.testing.assert_allclose(other.encode(clip), enc.encode(clip), atol=1e-6)


def test_weights_not_matching_the_config_are_named(models, tmp_path):
    from safetensors.torch import load_file, save_file

    root = copy_models(models, tmp_path / "m")
    weights = root / MODEL / "model.safetensors"
    state = load_file(str(weights))
    state.pop("audio_projection.linear2.weight")
    state["audio_projection.linear1.bias"] = torch.zeros(7)
    save_file(state, str(weights))
    with pytest.raises(TaxamapError) as info:
        load_audio_encoder(root)
    msg = str(info.value)
    assert "audio_projection.linear2.weight" in msg and "other shapes" in msg and "\n" not in msg


def test_wrapper_prefix_and_text_tower_are_tolerated(models, tmp_path, enc):
    """Weights saved from a Lightning wrapper ("model." prefix) or holding a text tower still load."""
    from safetensors.torch import load_file, save_file

    root = copy_models(models, tmp_path / "m")
    weights = root / MODEL / "model.safetensors"
    state = {"model." + k: v for k, v in load_file(str(weights)).items()}
    state["model.text_projection.linear1.weight"] = torch.zeros(4, 4)
    save_file(state, str(weights))
    clip = [(chirp(2), 48000)]
    np.testing.assert_allclose(load_audio_encoder(root).encode(clip), enc.encode(clip), atol=1e-6)


def test_config_settings_are_checked(models):
    bad = dict(DEFAULT_CONFIG, audio_truncation="rand_trunc")
    with pytest.raises(TaxamapError, match="enable_fusion"):
        load_audio_encoder(models, config=bad)
    with pytest.raises(TaxamapError, match="44100 Hz"):
        load_audio_encoder(models, config=dict(DEFAULT_CONFIG, audio_sample_rate=44100))
    with pytest.raises(TaxamapError, match="audio_padding"):
        load_audio_encoder(models, config=dict(DEFAULT_CONFIG, audio_padding="mirror"))
    # rshf's default truncation=True means TaxaBind's "fusion"; a missing key means the default.
    rshf_like = {k: v for k, v in DEFAULT_CONFIG.items() if k != "audio_max_length_s"}
    rshf_like["audio_truncation"] = True
    loaded = load_audio_encoder(models, config=rshf_like)
    assert (loaded.truncation, loaded.max_length) == ("fusion", 480000)
