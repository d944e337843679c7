"""``taxamap serve`` on a stored USA grid: server time of /api/map for new and cached species,
16 concurrent clients, server RSS, and (with --browser) Enter-to-paint in headless chromium.

    python serve.py [--cache DIR] [--resolution 0.05] [--species 50] [--clients 16]
                    [--seconds 30] [--browser] [--screenshot ../docs/serve.png]

The location encoder runs at full size with GeoCLIP's real weights (TaxaBind's architecture) and
the text tower at ViT-B/16 size (width 512, 12 layers) with random weights, so both the stored
cells and the per-prompt cost are real-size; the rest are the tiny test models. ``--cache`` keeps
the embedded grid between runs (the first run embeds it: ~1 min on 2 cores).

"New species" are species of the shipped taxonomy table the server has not seen (prompt not
cached); "cached" asks for them again; "new stretch" asks for them with another display stretch
(the overlay is drawn again, and the map scored again where the server's map cache dropped it).
Server time is the ``elapsed_ms`` /api/map reports (embedding the prompt, scoring every cell into
the Dataset, band statistics and drawing the overlay PNG); client time adds HTTP and JSON. The
concurrent clients each loop: /api/map, then its overlay PNG; once over the 50 species already
asked for, once with a species nobody asked for yet in every request.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import machine, models_dir, start_serve

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}


def full_size_text_tower(models: Path) -> None:
    """Replace the tiny CLIP with one whose text tower has ViT-B/16's size (random weights);
    the vision tower stays tiny (photos are not benchmarked here)."""
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    from tests.helpers.tiny import clip as tiny_clip

    folder = models / "MVRL" / "taxabind-vit-b-16"
    config = json.loads(json.dumps(tiny_clip.CONFIG))
    config["model_cfg"]["text_cfg"] = dict(TEXT_CFG)
    torch.manual_seed(0)
    model = CLIP(**config["model_cfg"])
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"), metadata={"format": "pt"})
    (folder / "open_clip_config.json").write_text(json.dumps(config))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def gemv_ms(n: int, dim: int = 512, repeats: int = 7) -> float:
    """Median ms of one float32 (n, dim) x (dim,) product here and now: the memory-bound floor
    of scoring a new species, and a gauge of how busy the machine is."""
    import numpy as np

    e = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
    q = np.ones(dim, dtype=np.float32)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        e @ q
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def start_server(args, models: Path, cache: Path) -> tuple[subprocess.Popen, str, float, list]:
    t = time.perf_counter()
    proc, url, log = start_serve(["--region", args.region, "--resolution", str(args.resolution),
                                  "--models", str(models), "--cache", str(cache)])
    return proc, url, time.perf_counter() - t, log


def timed_map(client, species: str) -> tuple[float, float, dict]:
    t = time.perf_counter()
    r = client.get("/api/map", params={"species": species})
    wall = (time.perf_counter() - t) * 1000.0
    r.raise_for_status()
    body = r.json()
    return body["elapsed_ms"], wall, body


def concurrent(url: str, pick, clients: int, seconds: float, pid: int) -> dict:
    """``clients`` threads for ``seconds``, each looping: /api/map of ``pick(rng)``'s species,
    then its overlay PNG. Server RSS is read at the start and the end."""
    import httpx

    latencies: list[float] = []
    overlay: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    rss_start = rss_mib(pid)[0]
    stop = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.perf_counter() < stop:
                name = pick(rng)
                try:
                    t = time.perf_counter()
                    r = client.get("/api/map", params={"species": name})
                    a = (time.perf_counter() - t) * 1000.0
                    r.raise_for_status()
                    t = time.perf_counter()
                    png = client.get(r.json()["overlay"])
                    b = (time.perf_counter() - t) * 1000.0
                    png.raise_for_status()
                    with lock:
                        latencies.append(a)
                        overlay.append(b)
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    samples = []  # server RSS every 5 s
    while any(th.is_alive() for th in threads):
        samples.append(round(rss_mib(pid)[0]))
        time.sleep(5)
    for th in threads:
        th.join()
    return {"requests": len(latencies), "errors": len(errors), "first_error": errors[:1],
            "rss_samples_mib": samples,
            "map_p50": pct(latencies, 50), "map_p95": pct(latencies, 95),
            "overlay_p95": pct(overlay, 95), "per_second": len(latencies) / seconds,
            "rss_start_mib": rss_start, "rss_end_mib": rss_mib(pid)[0]}


def browser_run(url: str, species: list[str], screenshot: str | None) -> list[float]:
    """Enter-to-ready (ms, the page's own clock) for each species; optionally a screenshot."""
    from playwright.sync_api import expect, sync_playwright

    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE "
                                          "127.0.0.1"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        expect(page.locator("#status")).to_contain_text("type a species", timeout=60000)
        for name in species:
            page.fill("#species", name)
            page.press("#species", "Enter")
            expect(page.locator("#status")).to_have_text("ready", timeout=60000)
            times.append(float(page.evaluate("document.body.dataset.paintMs")))
        if screenshot:
            page.goto(url + "?species=Cardinalis+cardinalis&threshold=percentile%3A97")
            expect(page.locator("#status")).to_have_text("ready", timeout=60000)
            box = page.locator("#map").bounding_box()
            page.mouse.click(box["x"] + box["width"] * 0.62, box["y"] + box["height"] * 0.55)
            page.wait_for_selector(".leaflet-popup-content table", timeout=20000)
            page.wait_for_timeout(400)
            page.screenshot(path=screenshot)
        browser.close()
    return times


def main() -> None:
    import httpx

    from taxamap.taxonomy import list_table_species

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", default="usa")
    parser.add_argument("--resolution", type=float, default=0.05)
    parser.add_argument("--cache", help="keep the embedded grid here between runs")
    parser.add_argument("--species", type=int, default=50)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--browser", action="store_true", help="also time the page in chromium")
    parser.add_argument("--screenshot", help="with --browser: save a 1280x800 screenshot here")
    parser.add_argument("--json", help="also write the figures as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = models_dir(tmp / "models")
        full_size_text_tower(models)
        cache = Path(args.cache) if args.cache else tmp / "cache"
        gemv_before = gemv_ms(334_276)
        proc, url, startup, log = start_server(args, models, cache)
        try:
            names = list_table_species()
            # The server warms up on the table's first species; skip it so every one is new.
            step = max(1, (len(names) - 1) // args.species)
            chosen = names[1::step][:args.species]
            fresh = [n for n in names[1:] if n not in set(chosen)]
            rss_start = rss_mib(proc.pid)
            with httpx.Client(base_url=url, timeout=120) as client:
                health = client.get("/api/health").json()
                new = [timed_map(client, s) for s in chosen]
                cached = [timed_map(client, s) for s in chosen]
                # Prompt cached, a new display stretch: the map is drawn again (and scored
                # again where the server's map cache dropped it).
                restretch = []
                for s in chosen[:10]:
                    r = client.get("/api/map", params={"species": s, "stretch": "80"})
                    r.raise_for_status()
                    restretch.append(r.json()["elapsed_ms"])
                t = time.perf_counter()
                png = client.get(new[-1][2]["overlay"])
                overlay_ms = (time.perf_counter() - t) * 1000.0
            known = concurrent(url, lambda rng: rng.choice(chosen), args.clients, args.seconds,
                               proc.pid)
            queue = iter(fresh)
            queue_lock = threading.Lock()

            def next_new(_rng):
                with queue_lock:
                    return next(queue)

            unseen = concurrent(url, next_new, args.clients, args.seconds, proc.pid)
            rss_end, rss_peak = rss_mib(proc.pid)
            paint = (browser_run(url, list(reversed(fresh))[:6], args.screenshot)
                     if args.browser else [])
        finally:
            proc.terminate()
            proc.wait(30)
        gemv_after = gemv_ms(334_276)

    def part(name: str) -> float:
        return statistics.median(n[2]["timings_ms"][name] for n in new)

    figures = {
        "machine": machine(), "load_average": os.getloadavg(),
        "gemv_ms_before_after": (gemv_before, gemv_after),
        "grid": f"{args.region} {args.resolution} deg, {health['cells']:,} cells",
        "startup_s": startup,
        "new_server_p50": pct([n[0] for n in new], 50),
        "new_server_p95": pct([n[0] for n in new], 95),
        "new_client_p50": pct([n[1] for n in new], 50),
        "new_parts_p50": {k: part(k) for k in ("embed", "score", "stats", "draw")},
        "cached_server_p50": pct([c[0] for c in cached], 50),
        "cached_server_max": max(c[0] for c in cached),
        "cached_client_p50": pct([c[1] for c in cached], 50),
        "restretch_server_p50": pct(restretch, 50),
        "overlay_png_kib": len(png.content) / 1024, "overlay_get_ms": overlay_ms,
        "concurrent_known": known, "concurrent_new": unseen,
        "rss_start_mib": rss_start[0], "rss_end_mib": rss_end, "rss_peak_mib": rss_peak,
        "browser_enter_to_paint_ms": paint,
    }
    parts = figures["new_parts_p50"]
    print(f"machine: {figures['machine']}; load average {figures['load_average']}")
    print(f"grid: {figures['grid']}; server start-up (grid stored) {startup:.1f} s")
    print(f"reference: one 334,276 x 512 float32 GEMV here takes {gemv_before:.0f} ms before "
          f"and {gemv_after:.0f} ms after the run (the scoring floor; higher = busier machine)")
    rows = [
        (f"/api/map new species, server p50 / p95 ({len(new)})",
         f"{figures['new_server_p50']:.0f} / {figures['new_server_p95']:.0f} ms"),
        ("  medians: prompt / score / stats / draw",
         " / ".join(f"{parts[k]:.0f}" for k in ("embed", "score", "stats", "draw")) + " ms"),
        ("/api/map new species, client p50", f"{figures['new_client_p50']:.0f} ms"),
        (f"/api/map cached species, server p50 / max ({len(cached)})",
         f"{figures['cached_server_p50']:.1f} / {figures['cached_server_max']:.1f} ms"),
        ("/api/map cached species, client p50", f"{figures['cached_client_p50']:.1f} ms"),
        ("/api/map prompt cached, new stretch, server p50",
         f"{figures['restretch_server_p50']:.0f} ms"),
        ("overlay PNG GET (drawn by /api/map); size",
         f"{overlay_ms:.1f} ms; {figures['overlay_png_kib']:.0f} KiB"),
    ]
    for label, load in (("known species", known), ("a new species each", unseen)):
        rows += [
            (f"{args.clients} clients x {args.seconds:.0f} s, {label}: requests, errors",
             f"{load['requests']}, {load['errors']}"),
            ("  /api/map p50 / p95 (client); overlay GET p95",
             f"{load['map_p50']:.0f} / {load['map_p95']:.0f}; {load['overlay_p95']:.0f} ms"),
            ("  server RSS at start / end", f"{load['rss_start_mib']:.0f} / "
             f"{load['rss_end_mib']:.0f} MiB"),
            ("  server RSS every 5 s", " ".join(map(str, load["rss_samples_mib"]))),
        ]
    rows.append(("server RSS after start-up / at the end / peak",
                 f"{rss_start[0]:.0f} / {rss_end:.0f} / {rss_peak:.0f} MiB"))
    if paint:
        rows.append((f"browser Enter -> painted ({len(paint)} new species) median / max",
                     f"{statistics.median(paint):.0f} / {max(paint):.0f} ms"))
    for label, value in rows:
        print(f"{label:<62} {value:>24}")
    for load in (known, unseen):
        if load["first_error"]:
            print("first error:", load["first_error"][0])
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
