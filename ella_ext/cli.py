"""``python -m ella_ext check``: load connectors and text encoders, encode a sample prompt, run the TSC at a few
timesteps and report shapes, timings, peak memory and any non-finite value: one pair, or every model of a folder."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ELLAError

SAMPLE_PROMPT = (
    "A vivid red book with a smooth, matte cover lies next to a glossy yellow vase, which holds a bouquet of "
    "white daisies; the two items sit on a rustic wooden table with a window behind them."
)
TIMESTEPS = (999.0, 750.5, 500.0, 250.0, 1.0)
DEFAULT_FIXED = 128  # the official connector's fixed length
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


def _length_label(max_length: int | None) -> str:
    return "flexible" if max_length is None else f"fixed {max_length}"


def encodings_of(encoder, lengths, device: torch.device, out=print):
    """Encode the sample prompt at each length (None: flexible); ``[(label, features, mask)]`` and how many had
    non-finite values. Fixed lengths give no mask: the TSC attends to the padding, as the reference does."""
    problems, encodings = 0, []
    for max_length in lengths:
        label = _length_label(max_length)
        (features, mask), ms = _timed(lambda ml=max_length: encoder.encode([SAMPLE_PROMPT], ml), device)
        encoder.cache.clear()
        bad = int((~torch.isfinite(features)).sum())
        problems += bad > 0
        layer = "" if encoder.layer is None else f" at layer {encoder.layer}"
        out(f"encode     {label}{layer}: features {list(features.shape)}, {int(mask.sum())} real tokens, "
            f"{ms:.1f} ms, non-finite values: {bad}")
        encodings.append((label, features, mask if max_length is None else None))
    return encodings, problems


def check_encoder(encoder_path, device: torch.device, dtype: torch.dtype | None, out=print, *, layer: int = -1,
                  lengths=(None, DEFAULT_FIXED)):
    """Load an LLM (a decoder-only one giving hidden state ``layer``) and encode the sample prompt at ``lengths``.
    Returns (encoder, [(label, features, mask)], problems)."""
    from . import load_text_encoder

    encoder, ms = _timed(lambda: load_text_encoder(encoder_path, device=device, dtype=dtype), device)
    encoder = encoder.with_layer(layer)  # refuses a layer the LLM does not have
    which = "encoder output" if encoder.layer is None else f"layer {encoder.layer} of {encoder.hidden_states}"
    out(f"LLM        {encoder_path}: hidden size {encoder.hidden_size}, {encoder.dtype}, {which}, loaded in "
        f"{ms:.0f} ms")
    encodings, problems = encodings_of(encoder, lengths, device, out)
    return encoder, encodings, problems


def trained_lengths(facts) -> tuple[int | None, ...]:
    """The lengths to test a connector with: flexible, and the fixed length it was trained with (128, the official
    connector's, when its file does not say; none more when it was trained flexible)."""
    if facts.token_length == "flexible":
        return (None,)
    return (None, facts.fixed_length or DEFAULT_FIXED)


def tested_with(encoder_name: str, encoder, lengths) -> str:
    """``tiny-llama at layer -2 in float32, tokens flexible and fixed 16``: what a connector was tested with."""
    layer = "" if encoder.layer is None else f" at layer {encoder.layer}"
    dtype = str(encoder.dtype).removeprefix("torch.")
    return f"{encoder_name}{layer} in {dtype}, tokens " + " and ".join(_length_label(n) for n in lengths)


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


def _facts_lines(name, facts, out) -> None:
    """What a connector's file says about its training, and any metadata value that could not be read."""
    said = [f"{key} {value}" for key, value in (("LLM", facts.llm), ("layer", facts.llm_layer),
                                                 ("tokens", facts.describe_tokens()),
                                                 ("features", facts.feature_dtype), ("base", facts.base_family))
            if value not in (None, "")]
    out(f"trained    {name}: " + (", ".join(said) if said else "its file does not say how (the official "
                                                                      "connector's settings are assumed)"))
    for problem in facts.problems:
        out(f"metadata   {name}: {problem}; ignored")


def check(connector_path, encoder_path, device_name: str, dtype_name: str | None, out=print) -> int:
    """One connector with one text encoder (they must fit each other), run as the connector was trained: its layer,
    its token length, and (without --dtype, on CUDA) the LLM precision its features had in training."""
    from . import connector_file

    device, dtype = torch.device(device_name), DTYPES[dtype_name]
    in_width = connector_file.read_config(connector_path).in_width  # a bad connector fails before the LLM loads
    facts = connector_file.read_training_facts(connector_path)
    _facts_lines(Path(connector_path).stem, facts, out)
    if facts.llm and connector_file.llm_key(facts.llm) != connector_file.llm_key(str(encoder_path)):
        out(f"note       the connector was trained with the LLM {facts.llm}, not {encoder_path}")
    lengths = trained_lengths(facts)
    encoder, encodings, problems = check_encoder(encoder_path, device, dtype or facts.llm_dtype(device), out,
                                                 layer=facts.layer, lengths=lengths)
    encoder.check_fits(in_width, str(connector_path))
    problems += check_connector(connector_path, encodings, device, dtype, out)
    out(f"tested with {tested_with(str(encoder_path), encoder, lengths)}")
    out(f"peak memory {_peak_memory(device)}")
    out("OK" if not problems else f"PROBLEM: {problems} outputs had non-finite values")
    return 0 if not problems else 1


@dataclass(frozen=True)
class LLMFolder:
    """A text encoder of the models folder, from its config alone: its name, path, kind and width."""

    name: str
    path: Path
    t5: bool
    width: int


def pair_llm(facts, width: int, llms: list[LLMFolder]) -> tuple[LLMFolder | None, str]:
    """The LLM of the folder to test a connector with, and why (or None and why it runs alone): the LLM its file
    names when that is here; else one of its width and of the same kind (T5-family encoder or decoder-only LLM) as
    the one its file names; a connector whose file names none (the official one): any of its width, a T5-family
    encoder first (the official connector's kind)."""
    from .connector_file import llm_key

    if facts.llm:
        named = [llm for llm in llms if llm_key(llm.name) == llm_key(facts.llm)]
        if named:
            return named[0], "the LLM its file names"
        kind = "T5-family" if facts.llm_is_t5 else "decoder-only"
        same = [llm for llm in llms if llm.width == width and llm.t5 == facts.llm_is_t5]
        if same:
            return same[0], f"its LLM {facts.llm} is not here; a {kind} LLM of its width"
        return None, f"its LLM {facts.llm} is not here, and no {kind} LLM here gives {width}-wide features"
    same = sorted((llm for llm in llms if llm.width == width), key=lambda llm: not llm.t5)  # stable: folder order
    if same:
        return same[0], ""
    return None, f"no text encoder here gives {width}-wide features"


def check_folder(models_dir: Path, device_name: str, dtype_name: str | None, out=print) -> int:
    """Every connector and every text encoder of a models folder, each reported; 1 if any is bad, 2 if none."""
    from . import connector_file, load_text_encoder
    from .llm_files import is_t5_family, read_encoder_config
    from .model_files import ModelPaths, list_connectors, list_text_encoders

    paths = ModelPaths.from_models_root(models_dir)
    connectors = [e for e in list_connectors(paths).values() if e.available]
    encoders = [e for e in list_text_encoders(paths).values() if e.available or e.problem]
    if not connectors and not encoders:
        print(HOW_TO_GET_MODELS.format(connectors=paths.connectors, encoders=paths.text_encoders), file=sys.stderr)
        return 2
    device, dtype = torch.device(device_name), DTYPES[dtype_name]
    verdicts: dict[str, str] = {}
    readable = {}  # connector name -> (entry, input width, training facts)
    for entry in connectors:
        try:
            width = connector_file.read_config(entry.path).in_width
            facts = connector_file.read_training_facts(entry.path)
        except ELLAError as err:
            verdicts[f"connector {entry.name}"] = f"BAD: {err}"
            continue
        readable[entry.name] = (entry, width, facts)
        _facts_lines(entry.name, facts, out)
    llms: list[LLMFolder] = []
    for entry in encoders:
        try:
            if entry.problem:
                raise ELLAError(entry.problem)
            model_type, width = read_encoder_config(entry.path)
        except ELLAError as err:
            verdicts[f"text encoder {entry.name}"] = f"BAD: {err}"
            continue
        llms.append(LLMFolder(entry.name, entry.path, is_t5_family(model_type), width))
    pairs = {name: pair_llm(facts, width, llms) for name, (_, width, facts) in readable.items()}
    for llm in llms:
        name = f"text encoder {llm.name}"
        try:
            encoder, _, problems = check_encoder(llm.path, device, dtype, out)
        except ELLAError as err:
            verdicts[name] = f"BAD: {err}"
            for connector, (found, _) in pairs.items():  # its connectors run alone, and say why
                if found is llm:
                    pairs[connector] = (None, f"its LLM {llm.name} could not be loaded (see that line)")
            continue
        verdicts[name] = "OK" if not problems else f"BAD: {problems} encodings had non-finite values"
        # its connectors, each with the LLM in the precision its features had in training (without --dtype, on CUDA;
        # ``TrainingFacts.llm_dtype``), grouped so that the LLM loads once per precision
        wanted = {c: dtype or facts.llm_dtype(device) for c, (_, _, facts) in readable.items()}
        loaded_in = encoder.dtype
        for connector in sorted((c for c, (found, _) in pairs.items() if found is llm),
                                key=lambda c: (wanted[c] != loaded_in, str(wanted[c]), c)):
            entry, width, facts = readable[connector]
            try:
                if encoder is None or wanted[connector] != encoder.dtype:
                    encoder = None  # free the other precision's weights first
                    encoder = load_text_encoder(llm.path, device=device, dtype=wanted[connector])
            except ELLAError as err:
                verdicts[f"connector {connector}"] = f"BAD: {err} (with {llm.name} in {wanted[connector]})"
                continue
            verdicts[f"connector {connector}"] = _paired_verdict(entry.path, width, encoder, llm.name, facts,
                                                                 pairs[connector][1], device, dtype, out)
        del encoder
    for connector, (entry, width, _) in readable.items():  # no LLM here for it: alone, on stand-in features
        if f"connector {connector}" not in verdicts:
            stand_in = [("stand-in features", *_sample_features(width, device, dtype))]
            verdicts[f"connector {connector}"] = _verdict(entry.path, stand_in, device, dtype, out,
                                                          f"alone: {pairs[connector][1]}")
    out(f"peak memory {_peak_memory(device)}")
    out("")
    for name, verdict in verdicts.items():
        out(f"{name}: {verdict}")
    bad = sum(not v.startswith("OK") for v in verdicts.values())
    out("OK" if not bad else f"PROBLEM: {bad} of {len(verdicts)} models")
    return 0 if not bad else 1


def _paired_verdict(path, width: int, encoder, encoder_name: str, facts, why: str, device, dtype, out) -> str:
    """A connector run on the folder's LLM as it was trained: the LLM's hidden state its file names (a view of the
    loaded LLM: no second load), its own token lengths."""
    lengths = trained_lengths(facts)
    because = f" ({why})" if why else ""
    try:
        view = encoder.with_layer(facts.layer)
        view.check_fits(width, Path(path).stem)  # the LLM its file names may not be the width it reads
    except ELLAError as err:
        return f"BAD: {err} (with {encoder_name}{because})"
    how = f"with {tested_with(encoder_name, view, lengths)}{because}"
    out(f"connector  {Path(path).stem}: tested {how}")
    encodings, problems = encodings_of(view, lengths, device, out)
    verdict = _verdict(path, encodings, device, dtype, out, how)
    if problems and verdict.startswith("OK"):
        return f"BAD: {problems} encodings had non-finite values ({how})"
    return verdict


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
