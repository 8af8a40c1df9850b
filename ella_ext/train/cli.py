"""``python -m ella_ext.train {train,cache,sample,estimate,eval} --config run.toml`` (also under ``accelerate launch -m
ella_ext.train`` and ``torchrun -m ella_ext.train``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import ELLAError

log = logging.getLogger("ella")

EPILOG = """\
Every config key, its default and its meaning: README.md, "Training connectors".
Several GPUs: accelerate launch -m ella_ext.train train --config run.toml
Several processes on CPUs: torchrun --standalone --nproc_per_node 2 -m ella_ext.train train --config run.toml
(accelerate launch --cpu starts one process only)."""


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="the run's TOML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (TOML value syntax; repeatable), e.g. --set train.steps=2000")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ella_ext.train", description=__doc__.splitlines()[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="train a connector", epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Train the TSC against the frozen base and LLM. Writes connector.safetensors, "
                                       "connector-step{N}.safetensors, metrics.jsonl, logs/ (TensorBoard), samples/ "
                                       "and checkpoints/ under [train] output. Ctrl-C or SIGTERM saves a checkpoint.")
    _config_args(train)
    train.add_argument("--resume", metavar="latest|PATH",
                       help="continue exactly from the newest checkpoint under [train] output/checkpoints, or from "
                            "a checkpoint folder; raising [train] steps trains on")
    train.add_argument("--overwrite", action="store_true",
                       help="delete the earlier run in [train] output (its connectors, checkpoints, metrics, logs "
                            "and samples) and start again; without it a folder holding a run is refused")
    cache = sub.add_parser("cache", help="pre-encode VAE latents and LLM features to disk",
                           description="Encode every image's latent and every caption's LLM features into [train] "
                                       "cache (split across processes). Training then reads the cache and needs "
                                       "neither the VAE encoder pass nor the LLM per step.")
    _config_args(cache)
    cache.add_argument("--force", action="store_true", help="delete an existing cache folder first")
    sample = sub.add_parser("sample", help="images from a connector and the base model",
                            description="Generate one image per prompt ([sample] prompts, or --prompt) with DDIM and "
                                        "guidance against the empty text; the TSC runs at every step.")
    _config_args(sample)
    sample.add_argument("--connector", required=True, type=Path, help="the connector .safetensors file")
    sample.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; replaces [sample] "
                                                                       "prompts)")
    sample.add_argument("--out", type=Path, help="folder for the images (default: [train] output/samples); an "
                                                 "image already there is never replaced")
    _eval_parser(sub)
    estimate = sub.add_parser("estimate", help="cache size, memory per device and time per step",
                              description="Count the data, size the cache and the memory the models, TSC and "
                                          "optimiser take, and time a few real training steps on random inputs.")
    _config_args(estimate)
    estimate.add_argument("--no-measure", action="store_true", help="skip the timed steps (nothing is loaded)")
    estimate.add_argument("--measure-steps", type=int, default=3, help="timed micro-batches (default 3)")
    return parser


def _eval_parser(sub) -> None:
    evaluate = sub.add_parser(
        "eval", help="score connectors (and the base model) on DPG-Bench-style questions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make --images-per-prompt images per prompt with each connector (and, with --baseline, with the "
                    "base's own CLIP), the same seeds for all; ask the judge every question about every image; score "
                    "by DPG-Bench's rule. Writes eval.json, answers.jsonl, images/ and report.html in --output. Run "
                    "the same command again to continue an interrupted eval.",
        epilog="DPG-Bench's questions: dpg_bench/dpg_bench.csv in github.com/TencentQQGYLab/ELLA. Several GPUs: "
               "accelerate launch -m ella_ext.train eval ... (prompts are split across processes).")
    _config_args(evaluate)
    evaluate.add_argument("--connector", action="append", default=[], type=Path, metavar="FILE",
                          help="a connector .safetensors to score (repeatable)")
    evaluate.add_argument("--baseline", action="store_true", help="also score the base model with its own text "
                                                                   "encoder (CLIP), on the same seeds")
    evaluate.add_argument("--questions", required=True, type=Path, help="DPG-Bench's dpg_bench.csv, or a .jsonl "
                                                                         "question file of your own")
    evaluate.add_argument("--vqa", required=True, metavar="JUDGE",
                          help="the judge: a transformers VQA model or image-text-to-text VLM (folder or hub id), "
                               "or module:function, a Python f(image, question) -> str importable from here")
    evaluate.add_argument("--images-per-prompt", type=int, default=4, metavar="N", help="images per prompt "
                                                                                         "(default 4, as DPG-Bench)")
    evaluate.add_argument("--limit", type=int, metavar="N", help="only the first N prompts")
    evaluate.add_argument("--output", required=True, type=Path, help="the eval's folder")
    evaluate.add_argument("--official-quirks", action="store_true",
                          help="score as DPG-Bench's own script does (its first CSV row skipped; categories from "
                               "the last image's answers before the parent rule), to compare with published tables")
    evaluate.add_argument("--judge-batch", type=int, default=16, metavar="N",
                          help="questions the judge answers at once (default 16)")
    evaluate.add_argument("--judge-dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                          help="the judge's precision (auto: float32 on a CPU; on a GPU bfloat16 for models released "
                               "in it, else float16)")
    evaluate.add_argument("--image-batch", type=int, default=0, metavar="N",
                          help="images per UNet batch (default: all of a prompt's images at once; lower it if "
                               "memory runs out)")


def _setup_logging(verbose: bool) -> None:
    """The trainer's own lines at INFO; other libraries' (accelerate's per-checkpoint lines, diffusers') only from
    WARNING unless -v."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ella").setLevel(logging.DEBUG if verbose else logging.INFO)


def run(args: argparse.Namespace) -> int:
    from .config import load_config

    config = load_config(args.config, args.overrides)
    if args.command == "train":
        from .loop import train

        result = train(config, resume=args.resume, overwrite=args.overwrite)
        if result.interrupted:
            print(f"Interrupted at step {result.step}; checkpoint {result.checkpoint}. Continue with --resume latest.")
            return 130
        print(f"Trained {result.step} steps: {result.connector}")
        return 0
    if args.command == "cache":
        return _cache(config, args.force)
    if args.command == "sample":
        return _sample(config, args)
    if args.command == "eval":
        return _eval(config, args)
    from .estimate import estimate, format_report

    report = estimate(config, measure=not args.no_measure, measure_steps=max(1, args.measure_steps))
    print(format_report(report, config))
    return 0


def _cache(config, force: bool) -> int:
    import shutil

    from .cache import build_cache, cache_complete
    from .model import load_base
    from .runtime import llm_dtype, load_encoder, make_accelerator, weight_dtype

    folder = config.cache_dir
    if folder is None:
        from .config import ConfigError

        raise ConfigError("[train] cache is empty: set it to the folder the cache goes in.")
    from .data import preflight

    preflight(config)  # the data's paths and captions, before any model loads
    accelerator = make_accelerator(config)
    if force and accelerator.is_main_process and folder.exists():
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    if cache_complete(folder):
        from .cache import CacheReader

        CacheReader(folder, config, str(llm_dtype(config, accelerator.device)).replace("torch.", ""))  # up to date?
        print(f"{folder} is complete and matches the data already (use --force to make it again).")
        return 0
    base = load_base(config, accelerator.device, weight_dtype(config))
    encoder = load_encoder(config, accelerator.device)
    dtype = str(llm_dtype(config, accelerator.device)).replace("torch.", "")
    build_cache(config, folder, accelerator, base, encoder, dtype)
    if accelerator.is_main_process:
        print(f"Cache written: {folder}")
    return 0


def _sample(config, args) -> int:
    import torch

    from .. import load_connector
    from .model import load_base
    from .runtime import load_encoder, make_accelerator, weight_dtype
    from .sample import encode_prompts, free_path, generate, save_sample

    prompts = args.prompt or config.sample["prompts"]
    if not prompts:
        from .config import ConfigError

        raise ConfigError("No prompt: give --prompt TEXT or set [sample] prompts.")
    accelerator = make_accelerator(config)
    device = accelerator.device
    connector = load_connector(args.connector, device, torch.float32)  # a bad file fails before the base loads
    config = config_as_trained(config, args.connector)
    base = load_base(config, device, weight_dtype(config))
    check_connector_fits_base(args.connector, connector, base)
    encoder = load_encoder(config, device)
    encoder.check_fits(connector.config.in_width, args.connector.name)
    conditions = encode_prompts(config, base, encoder, prompts)
    out = args.out or config.output / "samples"
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(generate(config, base, connector, conditions)):
        path = save_sample(image, free_path(out, f"{args.connector.stem}-{i}"), config, prompts[i], i,
                           args.connector.name)
        print(path)
    return 0


def _eval(config, args) -> int:
    from ..evaluate.run import evaluate
    from .config import ConfigError

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1.")
    try:
        result = evaluate(config, args.connector, args.baseline, args.questions, args.vqa, args.images_per_prompt,
                          args.limit, args.output, args.official_quirks, max(1, args.judge_batch), args.judge_dtype,
                          max(0, args.image_batch))
    except KeyboardInterrupt:
        print(f"Interrupted. The images and answers made so far are kept in {args.output}: run the same command "
              "again to continue.", file=sys.stderr)
        return 130
    if result is not None:
        width = max(len(name) for name in result["results"])
        print(f"{'':{width}}  overall  " + "  ".join(sorted(next(iter(result["results"].values()))["categories"])))
        for name, scores in result["results"].items():
            cells = "  ".join(f"{scores['categories'][c]:{len(c)}.2f}" for c in sorted(scores["categories"]))
            print(f"{name:{width}}  {scores['overall']:7.2f}  {cells}")
        for name, c in result["comparisons"].items():
            low, high = c["ci95"]
            print(f"{name} vs {c['against']}: {c['mean']:+.2f} points (95% interval {low:+.2f} to {high:+.2f}; "
                  f"better on {c['better']}, worse on {c['worse']} of {c['prompts']} prompts)")
        print(f"Report: {args.output / 'report.html'}")
    return 0


def config_as_trained(config, path: Path):
    """The config with [model] llm_layer, token_length and max_length as the connector file says it was trained (so
    a connector is sampled as the WebUI runs it); each change is logged. Its LLM is the config's: a different one is
    only warned about."""
    import dataclasses

    from ..connector_file import llm_key, read_training_facts

    facts = read_training_facts(path)
    model = dict(config.model)
    for key, value in (("llm_layer", facts.llm_layer), ("token_length", facts.token_length),
                       ("max_length", facts.max_length)):
        if value is not None and value != model[key]:
            log.info("ELLA train: %s was trained with %s = %s; sampling it so (the config says %s)", path.name, key,
                     value, model[key])
            model[key] = value
    if facts.llm and llm_key(facts.llm) != llm_key(config.model["llm"]):
        log.warning("ELLA train: %s was trained with the LLM %s, but [model] llm is %s: its images will not be what "
                    "it learned.", path.name, facts.llm, config.model["llm"])
    return dataclasses.replace(config, model=model)


def check_connector_fits_base(path: Path, connector, base) -> None:
    """A connector made for another model family (or context width) cannot condition this base's UNet."""
    from ..connector_file import META_BASE_FAMILY, read_metadata
    from .config import ConfigError

    family = read_metadata(path).get(META_BASE_FAMILY, "")
    width = connector.config.out_width
    if width != base.context_width or (family and family != base.family):
        made_for = f"an {family} base" if family else f"a UNet with a {width}-wide context"
        raise ConfigError(f"{path.name} was made for {made_for} ({width}-wide tokens), but [model] base "
                          f"{base.name} is {base.family} with a {base.context_width}-wide context. Use it with the "
                          "base it was trained for, or pick a connector trained on this base.")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return run(args)
    except ELLAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: {exc}. The trainer needs its extras: pip install -e .[train]", file=sys.stderr)
        return 2
