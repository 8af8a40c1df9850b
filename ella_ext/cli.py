"""``python -m ella_ext check``: load connectors and text encoders, encode a sample prompt, run the TSC at a few
timesteps and report shapes, timings, peak memory and any non-finite value: one pair, or every model of a folder."""

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
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, None: None}
HOW_TO_GET_MODELS = """\
No ELLA models were found.
  Connector: download ella-sd1.5-tsc-t5xl.safetensors from https://huggingface.co/QQGYLab/ELLA
             into {connectors}
  LLM:       the folder models--google--flan-t5-xl--text_encoder from the same repository,
             into {encoders} (or pass a hub id such as google/flan-t5-xl)
Then run this again, or: python -m ella_ext check --connector PATH --text-encoder PATH_OR_ID
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


def _sample_features(width: int, device: torch.device, dtype: torch.dtype | None):
    """Stand-in LLM features for a connector no text encoder on disk fits (the connector alone is still checked)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 77, width, generator=generator).to(device, dtype or torch.float32), None


def check_encoder(encoder_path, device: torch.device, dtype: torch.dtype | None, out=print):
    """Load an LLM and encode the sample prompt, flexible and fixed. Returns (encoder, [(label, features, mask)],
    problems)."""
    from . import load_text_encoder

    encoder, ms = _timed(lambda: load_text_encoder(encoder_path, device=device, dtype=dtype), device)
    out(f"LLM        {encoder_path}: hidden size {encoder.hidden_size}, {encoder.dtype}, loaded in {ms:.0f} ms")
    problems, encodings = 0, []
    for label, max_length in (("flexible", None), ("fixed 128", 128)):
        (features, mask), ms = _timed(lambda ml=max_length: encoder.encode([SAMPLE_PROMPT], ml), device)
        encoder.cache.clear()
        bad = int((~torch.isfinite(features)).sum())
        problems += bad > 0
        out(f"encode     {label}: features {list(features.shape)}, {int(mask.sum())} real tokens, {ms:.1f} ms, "
            f"non-finite values: {bad}")
        encodings.append((label, features, mask if max_length is None else None))  # fixed attends to the padding
    return encoder, encodings, problems


def check_connector(connector_path, encodings, device: torch.device, dtype: torch.dtype | None, out=print) -> int:
    """Load a connector and run it at five timesteps on each encoding; returns how many outputs were non-finite."""
    from . import load_connector

    connector, ms = _timed(lambda: load_connector(connector_path, device=device, dtype=dtype or torch.float32),
                           device)
    out(f"connector  {connector_path}: {connector.config} loaded in {ms:.0f} ms ({connector.dtype}, {device})")
    problems = 0
    for label, features, mask in encodings:
        for t in TIMESTEPS:
            ctx, ms = _timed(lambda x=features, ts=t, m=mask: connector(x, ts, m), device)
            bad = int((~torch.isfinite(ctx)).sum())
            problems += bad > 0
            out(f"TSC        {label}, t={t:>6}: context {list(ctx.shape)} {ctx.dtype}, {ms:.2f} ms, "
                f"mean |x| {ctx.float().abs().mean():.4f}, non-finite values: {bad}")
    return problems


def check(connector_path, encoder_path, device_name: str, dtype_name: str | None, out=print) -> int:
    """One connector with one text encoder (they must fit each other)."""
    from . import connector_file

    device, dtype = torch.device(device_name), DTYPES[dtype_name]
    in_width = connector_file.read_config(connector_path).in_width  # a bad connector fails before the LLM loads
    encoder, encodings, problems = check_encoder(encoder_path, device, dtype, out)
    encoder.check_fits(in_width, str(connector_path))
    problems += check_connector(connector_path, encodings, device, dtype, out)
    out(f"peak memory {_peak_memory(device)}")
    out("OK" if not problems else f"PROBLEM: {problems} outputs had non-finite values")
    return 0 if not problems else 1


def check_folder(models_dir: Path, device_name: str, dtype_name: str | None, out=print) -> int:
    """Every connector and every text encoder of a models folder, each reported; 1 if any is bad, 2 if none."""
    from . import connector_file
    from .model_files import ModelPaths, list_connectors, list_text_encoders

    paths = ModelPaths.from_models_root(models_dir)
    connectors = [e for e in list_connectors(paths).values() if e.available]
    encoders = [e for e in list_text_encoders(paths).values() if e.available or e.problem]
    if not connectors and not encoders:
        print(HOW_TO_GET_MODELS.format(connectors=paths.connectors, encoders=paths.text_encoders), file=sys.stderr)
        return 2
    device, dtype = torch.device(device_name), DTYPES[dtype_name]
    verdicts: dict[str, str] = {}
    widths: dict[str, int] = {}
    for entry in connectors:
        try:
            widths[entry.name] = connector_file.read_config(entry.path).in_width
        except ELLAError as err:
            verdicts[f"connector {entry.name}"] = f"BAD: {err}"
    for entry in encoders:
        name = f"text encoder {entry.name}"
        if entry.problem:
            verdicts[name] = f"BAD: {entry.problem}"
            continue
        try:
            encoder, encodings, problems = check_encoder(entry.path, device, dtype, out)
        except ELLAError as err:
            verdicts[name] = f"BAD: {err}"
            continue
        verdicts[name] = "OK" if not problems else f"BAD: {problems} encodings had non-finite values"
        for connector in [c for c in connectors if widths.get(c.name) == encoder.hidden_size]:
            if f"connector {connector.name}" not in verdicts:
                verdicts[f"connector {connector.name}"] = _verdict(connector.path, encodings, device, dtype, out,
                                                                   f"with {entry.name}")
        del encoder, encodings
    for connector in connectors:  # no text encoder on disk reads its width: the connector alone, on stand-in features
        if f"connector {connector.name}" not in verdicts:
            stand_in = [("stand-in features", *_sample_features(widths[connector.name], device, dtype))]
            verdicts[f"connector {connector.name}"] = _verdict(
                connector.path, stand_in, device, dtype, out,
                f"alone: no text encoder here gives {widths[connector.name]}-wide features")
    out(f"peak memory {_peak_memory(device)}")
    out("")
    for name, verdict in verdicts.items():
        out(f"{name}: {verdict}")
    bad = sum(not v.startswith("OK") for v in verdicts.values())
    out("OK" if not bad else f"PROBLEM: {bad} of {len(verdicts)} models")
    return 0 if not bad else 1


def _verdict(path, encodings, device, dtype, out, how: str) -> str:
    try:
        problems = check_connector(path, encodings, device, dtype, out)
    except ELLAError as err:
        return f"BAD: {err}"
    return f"OK ({how})" if not problems else f"BAD: {problems} outputs had non-finite values ({how})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ella_ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="load the models and run them once on a sample prompt",
                       description="With --connector and --text-encoder: that pair. Without them: every connector "
                                   "and text encoder of the models folder, each reported; the exit code is 1 if any "
                                   "is bad, 2 if there are none.")
    p.add_argument("--connector", help="a connector .safetensors file")
    p.add_argument("--text-encoder", help="an LLM folder or hub id")
    p.add_argument("--models-dir", default=os.environ.get("ELLA_MODELS_DIR", "models"),
                   help="the WebUI's models folder, checked whole when no pair is given (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="default: fp16 on CUDA, fp32 elsewhere (the connector runs in fp32 unless this is given)")
    args = parser.parse_args(argv)
    if bool(args.connector) != bool(args.text_encoder):
        parser.error("give both --connector and --text-encoder, or neither to check the whole models folder")
    try:
        if args.connector:
            return check(args.connector, args.text_encoder, args.device, args.dtype)
        return check_folder(Path(args.models_dir), args.device, args.dtype)
    except ELLAError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
