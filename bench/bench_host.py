"""ELLA on against ELLA off in a running WebUI, side by side, through its API (A1111 or Forge, started with --api).

    python bench/bench_host.py --url http://127.0.0.1:7861 --pid 12345 \\
        --ella '{"enabled": true, "connector": "my-sdxl-connector", "text_encoder": "flan-t5-xl"}' \\
        --width 1024 --height 1024 --steps 20 --repeats 3 [--log webui.log] [--hires] [--batch-size 1] \\
        [--settings '{"live_previews_enable": false}']

Each round makes one image with ELLA off and one with ELLA on (the same prompt, seed, size, steps and sampler), in
alternating order (off first in even rounds, on first in odd ones), after one warm-up image of each that is not
counted (the first ELLA image loads the LLM and the connector). For every request it reports the wall time of the
request, and with ``--pid`` (the WebUI's python process) the peak resident memory seen while it ran (``/proc`` read
every 20 ms by a sampling thread: a benchmark's figure, not a test's) and the resident memory before it. With
``--log`` (the WebUI's log file) it prints the log lines each ELLA request added that mention memory or ELLA (Forge's
memory manager says what it loaded and freed). It prints a Markdown report: the numbers go to docs/PERFORMANCE.md
with the machine, the host and its commit, the checkpoint and the connector they came from.

Needs only the standard library (it can run with the WebUI's own python or any other).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def rss_bytes(pid: int) -> int:
    """The process's resident memory now (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


class PeakSampler:
    """Samples a process's resident memory in a thread until stopped; ``peak`` is the largest value seen."""

    def __init__(self, pid: int | None, every: float = 0.02):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(self.every)

    def __enter__(self):
        if self.pid:
            self.peak = rss_bytes(self.pid)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.pid:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes(self.pid))


def post(url: str, payload: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read())
    except urllib.error.URLError as err:
        raise SystemExit(f"{url}: {getattr(err, 'reason', err)}. Is the WebUI running there, started with --api?") \
            from err


def payload(args, ella_on: bool) -> dict:
    body = {"prompt": args.prompt, "negative_prompt": args.negative, "seed": args.seed, "steps": args.steps,
            "width": args.width, "height": args.height, "cfg_scale": 7, "sampler_name": args.sampler,
            "batch_size": args.batch_size, "n_iter": 1, "send_images": False, "save_images": False}
    if args.hires:
        body.update(enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_second_pass_steps=max(1, args.steps // 2),
                    hr_upscaler="Latent")
    if args.settings:
        body["override_settings"] = json.loads(args.settings)
    ella = dict(json.loads(args.ella), enabled=ella_on)
    body["alwayson_scripts"] = {"ELLA": {"args": [ella]}}
    return body


def log_size(path: str | None) -> int:
    return Path(path).stat().st_size if path and Path(path).exists() else 0


def new_log_lines(path: str | None, start: int) -> list[str]:
    if not path:
        return []
    with open(path, "rb") as log:
        log.seek(start)
        text = log.read().decode(errors="replace")
    keep = ("memory", "ella", "moving", "loaded", "unload")
    return [line for line in text.splitlines() if any(word in line.lower() for word in keep)]


def one(args, ella_on: bool) -> dict:
    start_log = log_size(args.log)
    before = rss_bytes(args.pid) if args.pid else 0
    with PeakSampler(args.pid) as sampler:
        began = time.perf_counter()
        answer = post(f"{args.url.rstrip('/')}/sdapi/v1/txt2img", payload(args, ella_on), args.timeout)
        seconds = time.perf_counter() - began
    info = json.loads(answer.get("info") or "{}")
    text = (info.get("infotexts") or [""])[0]
    if ella_on and "ELLA:" not in text:
        raise SystemExit(f"ELLA did not condition the ELLA-on image; its parameters: {text!r}")
    if not ella_on and "ELLA:" in text:
        raise SystemExit(f"ELLA conditioned the ELLA-off image; its parameters: {text!r}")
    return {"ella": ella_on, "seconds": seconds, "rss_before": before, "rss_peak": sampler.peak,
            "log": new_log_lines(args.log, start_log), "infotext": text}


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def report(args, runs: list[dict], warmups: list[dict]) -> str:
    lines = ["# ELLA on / off in a running WebUI", "",
             f"{args.url}, {args.width}x{args.height}, {args.steps} steps, {args.sampler}, batch {args.batch_size}"
             f"{', hires 1.5x' if args.hires else ''}; {args.repeats} rounds after one warm-up of each", "",
             "| ELLA | median s | min s | max s | peak RSS GiB (max) | RSS before GiB (median) |",
             "|---|---|---|---|---|---|"]
    medians = {}
    for on in (False, True):
        mine = [r for r in runs if r["ella"] == on]
        times = [r["seconds"] for r in mine]
        medians[on] = statistics.median(times)
        peak = gib(max(r["rss_peak"] for r in mine)) if args.pid else "-"
        before = gib(statistics.median(r["rss_before"] for r in mine)) if args.pid else "-"
        lines.append(f"| {'on' if on else 'off'} | {medians[on]:.2f} | {min(times):.2f} | {max(times):.2f} | "
                     f"{peak} | {before} |")
    lines += ["", f"ELLA on / off, median time: {medians[True] / medians[False]:.3f}x"]
    first_off, first_on = (next(r for r in warmups if r["ella"] == on) for on in (False, True))
    lines += ["", f"First ELLA image (loads the models): {first_on['seconds']:.2f} s"
              + (f", RSS before {gib(first_on['rss_before'])} GiB, peak {gib(first_on['rss_peak'])} GiB" if args.pid
                 else "")]
    if args.pid:  # the warm-up without ELLA comes first: the host before ELLA's models were ever loaded
        lines += [f"First ELLA-off image (the host before ELLA loaded anything): RSS before "
                  f"{gib(first_off['rss_before'])} GiB, peak {gib(first_off['rss_peak'])} GiB"]
    if args.log:
        lines += ["", "Log lines of the first ELLA image and of the last ELLA-on round (memory, ELLA):", "```"]
        lines += first_on["log"][-40:] + ["..."] + next(r for r in reversed(runs) if r["ella"])["log"][-40:] + ["```"]
    lines += ["", f"ELLA image's parameters: `{first_on['infotext']}`"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--ella", required=True, help="ELLA's named-field args as JSON (connector, text_encoder...)")
    parser.add_argument("--pid", type=int, help="the WebUI's python process, for its memory")
    parser.add_argument("--log", help="the WebUI's log file, for its memory manager's lines")
    parser.add_argument("--prompt", default="a red cube on a blue sphere beside a green cone, studio light")
    parser.add_argument("--negative", default="blurry")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="Euler")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--hires", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--settings", help="the host's settings for these requests, as JSON (override_settings), e.g. "
                                           '\'{"sd_model_checkpoint": "sdxl-base", "live_previews_enable": false}\'')
    args = parser.parse_args(argv)
    for flag, text in (("--ella", args.ella), ("--settings", args.settings or "{}")):  # before any image
        try:
            json.loads(text)
        except ValueError as err:
            parser.error(f"{flag} is not JSON ({err}): give an object, e.g. '{{\"connector\": \"name\"}}'")
    warmups = [one(args, False), one(args, True)]
    runs = []
    for round_ in range(args.repeats):
        order = (False, True) if round_ % 2 == 0 else (True, False)
        runs += [one(args, on) for on in order]
        print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    print(report(args, runs, warmups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
