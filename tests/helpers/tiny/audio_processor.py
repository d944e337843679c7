"""laion/clap-htsat-fused: its ``preprocessor_config.json`` (the ClapFeatureExtractor settings).

The values are the released file's (a small JSON, so the real one is written, not a tiny stand-in):
64 mel bins, 48 kHz, hop 480, FFT 1024, 50-14000 Hz, 10 s, "repeatpad" padding, "fusion"
truncation.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.tiny import write_json

PREPROCESSOR = {
    "chunk_length_s": 10,
    "feature_extractor_type": "ClapFeatureExtractor",
    "feature_size": 64,
    "fft_window_size": 1024,
    "frequency_max": 14000,
    "frequency_min": 50,
    "hop_length": 480,
    "max_length_s": 10,
    "n_fft": 1024,
    "nb_frequency_bins": 513,
    "nb_max_frames": 1000,
    "nb_max_samples": 480000,
    "padding": "repeatpad",
    "padding_side": "right",
    "padding_value": 0.0,
    "processor_class": "ClapProcessor",
    "return_attention_mask": False,
    "sampling_rate": 48000,
    "top_db": None,
    "truncation": "fusion",
}


def write(folder: Path, seed: int = 0) -> None:
    del seed  # the file holds settings only
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "preprocessor_config.json", PREPROCESSOR)
