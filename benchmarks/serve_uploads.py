"""``taxamap serve`` under costly uploads: the server's memory for 6 concurrent pixel-bomb PNGs
and for 50 slow ~13.5 MB uploads, and /api/map latency for new species while uploads run.

    python serve_uploads.py [--tree DIR] [--server-args "--max-uploads 50"]
                            [--only bombs,photos,slow,latency]
                            [--json out.json]

The server runs in its own process (its RSS read from /proc: VmRSS now, VmHWM the peak since a
reset through /proc/PID/clear_refs) over a 2 x 2 deg box at 0.1 deg (400 cells) with the tiny
test models (tests/helpers/tiny: a tiny CLIP, so a photo's forward pass is milliseconds and what is
measured is decoding, buffering and waiting). ``--tree DIR`` serves another checkout (e.g.
``git archive REV | tar -x -C DIR``, with ``ln -s ../grids DIR/taxamap/grids``): the "before"
figures; the clients are always this checkout's.

- bombs: 6 clients at once each POST a 420 kB PNG declaring 12000 x 12000 pixels (432 MB of RGB).
- photos: 6 clients at once each POST a 24 Mpx JPEG photo (6000 x 4000, 6 MB).
- slow: 50 clients at once each send a ~13.5 MB upload (a small JPEG padded after its end) at
  ~0.7 MB/s, reading the answer as soon as it comes (as curl and browsers do).
- latency: new species, one after another for 20 s, with no uploads, then while 2 clients keep
  uploading 24 Mpx JPEG photos (each new), then while 2 clients keep uploading pixel bombs.

The first photo upload (which loads the image encoder) happens before any figure is taken.
"""

from __future__ import annotations

import argparse
import io
import json
import select
import shlex
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, machine, models_dir, start_serve

BBOX = "-84,39,-82,41"


def memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def jpeg(width: int, height: int) -> bytes:
    """A smooth photo-like JPEG (gradients and noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.int16)
    arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def post_raw(url: str, data: bytes, name: str, rate: float | None = None,
             timeout: float = 600.0) -> int:
    """POST ``data`` as the multipart ``file`` over a raw socket, at ``rate`` bytes/s (None: as
    fast as possible), then read the status; 0 when the connection broke first. Like curl or a
    browser, stop sending when the server answers early (a refusal)."""
    host, port = url.split("//")[1].strip("/").split(":")
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + name.encode()
            + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + b"\r\n--b--\r\n")
    head = (b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: %d\r\n\r\n"
            % len(body))
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.sendall(head)
            step = 65536
            t0 = time.perf_counter()
            for start in range(0, len(body), step):
                if select.select([conn], [], [], 0)[0]:
                    break  # answered before the body was sent
                conn.sendall(body[start:start + step])
                if rate:
                    ahead = (start + step) / rate - (time.perf_counter() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
            answer = b""
            while b"\r\n" not in answer:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                answer += chunk
        return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    except OSError:
        return 0


def at_once(count: int, job) -> tuple[list, float]:
    results = [None] * count
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, job(i)))
               for i in range(count)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def statuses(codes: list[int]) -> str:
    counts: dict[int, int] = {}
    for code in codes:
        counts[code] = counts.get(code, 0) + 1
    return ", ".join(f"{n} x {code or 'broken'}" for code, n in sorted(counts.items()))


def sampled_peak(pid: int, stop: threading.Event, out: list[float]) -> None:
    """Sample VmRSS every 50 ms (VmHWM is the kernel's exact peak; this shows the same)."""
    while not stop.is_set():
        out.append(memory_mib(pid)["VmRSS"])
        time.sleep(0.05)


def memory_run(pid: int, count: int, job) -> dict:
    reset_peak(pid)
    before = memory_mib(pid)["VmRSS"]
    codes, seconds = at_once(count, job)
    peak = memory_mib(pid)["VmHWM"]
    time.sleep(3.0)
    after = memory_mib(pid)["VmRSS"]
    return {"answers": statuses(codes), "seconds": round(seconds, 1), "rss_before_mib": before,
            "peak_over_mib": round(peak - before), "after_over_mib": round(after - before)}


def species_latency(url: str, names: list[str], seconds: float = 20.0) -> dict:
    """/api/map of new species one after another for ``seconds`` (the last one may run over)."""
    import httpx

    times = []
    stop = time.perf_counter() + seconds
    with httpx.Client(base_url=url, timeout=600) as client:
        for name in names:
            if time.perf_counter() > stop:
                break
            t = time.perf_counter()
            r = client.get("/api/map", params={"species": name})
            r.raise_for_status()
            times.append((time.perf_counter() - t) * 1000.0)
    times.sort()
    return {"n": len(times), "p50_ms": round(statistics.median(times), 1),
            "max_ms": round(times[-1], 1)}


def with_uploads(url: str, make, names: list[str]) -> dict:
    """Species latency while 2 clients keep uploading ``make(i)`` (distinct bytes each time)."""
    stop = threading.Event()
    codes: list[int] = []

    def uploader(k: int) -> None:
        i = 0
        while not stop.is_set():
            codes.append(post_raw(url, make(1000 * k + i), f"u{k}-{i}"))
            i += 1

    threads = [threading.Thread(target=uploader, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the uploads are under way
    try:
        out = species_latency(url, names)
    finally:
        stop.set()
        for t in threads:
            t.join()
    out["uploads"] = statuses(codes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(ROOT), help="checkout whose taxamap serves")
    parser.add_argument("--server-args", default="", help="more `taxamap serve` options")
    parser.add_argument("--only", default="bombs,photos,slow,latency")
    parser.add_argument("--json", help="also write the figures as JSON")
    args = parser.parse_args()
    only = set(args.only.split(","))

    from taxamap.taxonomy import list_table_species
    from tests.helpers.bombs import png_bomb

    figures: dict = {"machine": machine(), "tree": args.tree, "server_args": args.server_args}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = models_dir(tmp / "models", real_location=False)
        bomb = png_bomb(tmp / "bomb.png", 12000, 12000, level=9).read_bytes()
        figures["bomb_bytes"] = len(bomb)
        proc, url, log = start_serve([f"--bbox={BBOX}", "--resolution", "0.1", "--models",
                                      str(models), "--cache", str(tmp / "cache"),
                                      *shlex.split(args.server_args)], Path(args.tree))
        try:
            # The first photo loads the image encoder (~280 MB of imports and weights): not
            # what is measured.
            assert post_raw(url, jpeg(64, 48), "warm.jpg") == 200
            if "bombs" in only:
                figures["bombs"] = memory_run(
                    proc.pid, 6, lambda i: post_raw(url, bomb + b"%d" % i, f"bomb{i}.png"))
                print("bombs", figures["bombs"], flush=True)
            photo = jpeg(6000, 4000)
            figures["photo_bytes"] = len(photo)
            if "photos" in only:
                figures["photos"] = memory_run(
                    proc.pid, 6, lambda i: post_raw(url, photo + b"%d" % i, f"photo{i}.jpg"))
                print("photos", figures["photos"], flush=True)
            if "slow" in only:
                small = jpeg(640, 480)
                pad = 13_500_000 - len(small)

                def slow(i: int) -> int:
                    return post_raw(url, small + bytes(pad - 8) + b"%08d" % i, f"big{i}.jpg",
                                    rate=700_000)

                figures["slow"] = memory_run(proc.pid, 50, slow)
                print("slow", figures["slow"], flush=True)
            if "latency" in only:
                names = list_table_species()
                runs = {}
                runs["idle"] = species_latency(url, names[10::3])
                runs["photos"] = with_uploads(url, lambda i: photo + b"%d" % i, names[11::3])
                runs["bombs"] = with_uploads(url, lambda i: bomb + b"%d" % i, names[12::3])
                figures["latency"] = runs
                print("latency", runs, flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
        figures["server_log_lines"] = len(log)
        figures["server_log_tail"] = [line.rstrip() for line in log[-5:]]
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
