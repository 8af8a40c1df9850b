"""``python -m ella_ext check``: load a connector and a text encoder, encode a sample prompt, run the TSC at a few
timesteps and report shapes, timings, peak memory and any non-finite value."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from .errors import ELLAError

SAMPLE_PROMPT = (
    "A vivid red book with a smooth, matte cover lies next to a glossy yellow vase, which holds a bouquet of "
    "white daisies; the two items sit on a rustic wooden table with a window behind them."
)
TIMESTEPS = (999.0, 750.5, 500.0, 250.0, 1.0)
HOW_TO_GET_MODELS = """\
No ELLA models were found.
  Connector: download ella-sd1.5-tsc-t5xl.safetensors from https://huggingface.co/QQGYLab/ELLA
             into {connectors}
  LLM:       the folder models--google--flan-t5-xl--text_encoder from the same repository,
             into {encoders} (or pass a hub id such as google/flan-t5-xl)
Then run: python -m ella_ext check --connector PATH --text-encoder PATH_OR_ID
(--models-dir DIR, or the ELLA_MODELS_DIR environment variable, says where the WebUI's models folder is.)"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, (time.perf_counter() - start) * 1000


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA peak allocated)"
    try:
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process peak RSS)"
    except ImportError:  # Windows
        return "n/a"


def _default_paths(models_dir: Path) -> tuple[Path | None, Path | None, Path, Path]:
    """The first connector and text encoder already on disk (the official ones first), and the two folders."""
    from .model_files import ModelPaths, list_connectors, list_text_encoders

    paths = ModelPaths.from_models_root(models_dir)

    def first(entries):
        ready = sorted((e for e in entries.values() if e.available), key=lambda e: not e.official)
        return ready[0].path if ready else None

    return first(list_connectors(paths)), first(list_text_encoders(paths)), paths.connectors, paths.text_encoders


def check(connector_path, encoder_path, device_name: str, dtype_name: str | None, out=print) -> int:
    from . import load_connector, load_text_encoder

    device = torch.device(device_name)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, None: None}[dtype_name]
    connector, ms = _timed(lambda: load_connector(connector_path, device=device, dtype=dtype or torch.float32), device)
    cfg = connector.config
    out(f"connector  {connector_path}: {cfg} loaded in {ms:.0f} ms ({connector.dtype}, {device})")
    encoder, ms = _timed(lambda: load_text_encoder(encoder_path, device=device, dtype=dtype), device)
    out(f"LLM        {encoder_path}: hidden size {encoder.hidden_size}, {encoder.dtype}, loaded in {ms:.0f} ms")
    encoder.check_fits(cfg.in_width, str(connector_path))
    problems = 0
    for label, max_length in (("flexible", None), ("fixed 128", 128)):
        (features, mask), ms = _timed(lambda ml=max_length: encoder.encode([SAMPLE_PROMPT], ml), device)
        encoder.cache.clear()
        bad = int((~torch.isfinite(features)).sum())
        problems += bad > 0
        out(f"encode     {label}: features {list(features.shape)}, {int(mask.sum())} real tokens, {ms:.1f} ms, "
            f"non-finite values: {bad}")
        tsc_mask = mask if max_length is None else None  # fixed length attends to the padding, as the reference
        for t in TIMESTEPS:
            ctx, ms = _timed(lambda x=features, ts=t, m=tsc_mask: connector(x, ts, m), device)
            bad = int((~torch.isfinite(ctx)).sum())
            problems += bad > 0
            out(f"TSC        t={t:>6}: context {list(ctx.shape)} {ctx.dtype}, {ms:.2f} ms, "
                f"mean |x| {ctx.float().abs().mean():.4f}, non-finite values: {bad}")
    out(f"peak memory {_peak_memory(device)}")
    out("OK" if not problems else f"PROBLEM: {problems} outputs had non-finite values")
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ella_ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="load the models and run them once on a sample prompt")
    p.add_argument("--connector", help="a connector .safetensors file")
    p.add_argument("--text-encoder", help="an LLM folder or hub id")
    p.add_argument("--models-dir", default=os.environ.get("ELLA_MODELS_DIR", "models"),
                   help="the WebUI's models folder, searched when a path is not given (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="default: fp16 on CUDA, fp32 elsewhere (the connector runs in fp32 unless this is given)")
    args = parser.parse_args(argv)

    found_connector, found_encoder, connectors, encoders = _default_paths(Path(args.models_dir))
    connector = args.connector or found_connector
    encoder = args.text_encoder or found_encoder
    if connector is None or encoder is None:
        print(HOW_TO_GET_MODELS.format(connectors=connectors, encoders=encoders), file=sys.stderr)
        return 2
    try:
        return check(connector, encoder, args.device, args.dtype)
    except ELLAError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
