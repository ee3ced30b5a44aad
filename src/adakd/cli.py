"""The `adakd` command: train, distill, abl, eval, export, sweep, sweeps, teachers, table, compare, models, methods,
demo, presets, plot, decisions."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. optim.lr=0.01 model.name=resnet20")
    parser.add_argument("--preset", action="append", default=[], metavar="NAME",
                        help="a shipped preset (see `adakd presets`); may be repeated")
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="a YAML config file")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pth")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="adakd", description="Adaptive knowledge distillation toolkit.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train a model alone (e.g. a teacher) with cross-entropy")
    _add_run_arguments(train)
    distill = sub.add_parser("distill", help="train a student under a frozen teacher")
    _add_run_arguments(distill)
    abl = sub.add_parser("abl", help="ABL's two stages in one: gamma search on a held-out split, then retraining")
    _add_run_arguments(abl)
    abl.add_argument("--seeds", type=int, default=1, help="stage-2 runs (seeds seed, seed+1, ...) reusing one gamma")
    ev = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on a dataset's test split")
    ev.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    # default=[]: argparse counts a "*" positional without a default as required in its "required:" error.
    ev.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="e.g. model.name=resnet56 data.name=cifar100 data.root=PATH (needed for a bare checkpoint)")
    ev.add_argument("--preset", action="append", default=[], metavar="NAME")
    ev.add_argument("--checkpoint", choices=("last", "best"), default="last",
                    help="for a run folder: score last.pth (default; the number to compare) or best.pth")
    ex = sub.add_parser("export", help="write a run's student alone (safetensors, TorchScript or ONNX) with a model "
                                       "card (.json, .md) beside it")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="the folder of an `adakd train` or `adakd distill` run")
    ex.add_argument("--checkpoint", choices=("last", "best"), default="last",
                    help="export last.pth (default) or best.pth")
    # No argparse choices: an unknown format gets adakd's one-line error, not a usage block.
    ex.add_argument("--format", default=None, metavar="FORMAT",
                    help="safetensors (default), torchscript or onnx (needs pip install \"adakd[onnx]\"); without "
                         "it, --out's suffix (.safetensors, .pt, .onnx) decides")
    ex.add_argument("--out", default=None, metavar="PATH",
                    help="the exported file (default RUN_DIR/export/<model>-<checkpoint>.<ext>); the model card "
                         "goes beside it as PATH.json and PATH.md; its folder must exist")
    ex.add_argument("--force", action="store_true", help="replace an existing exported file and its model card")
    ex.add_argument("--latency-batch", type=int, default=32, metavar="N",
                    help="batch size of the model card's CPU latency (median of 5 runs; 0 skips it)")
    ms = sub.add_parser("models", help="list every model with its parameter count and feature shapes")
    ms.add_argument("pattern", nargs="?", default="*")
    ms.add_argument("--input-size", type=int, default=None, help="input side (default: 32, ImageNet models 224)")
    ms.add_argument("--num-classes", type=int, default=None)
    ms.add_argument("--source", choices=("zoo", "timm", "torchvision"), default="zoo",
                    help="adakd's zoo (with sizes and shapes) or the names timm / torchvision offer (names only)")
    demo = sub.add_parser("demo", help="teacher, student alone, KD, KD+SAKD and KD+ABL on the embedded digits (the "
                                       "shipped grid `demo`)")
    demo.add_argument("--out", default="runs", help="parent folder of the demo's sweep folder")
    demo.add_argument("--seeds", type=int, default=3, help="seeds per run (the table shows mean ± std)")
    demo.add_argument("--jobs", type=int, default=None, help="runs at once (default: one per CPU core, at most 6)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every run")
    sw = sub.add_parser("sweep", help="run a grid of runs (a shipped grid, a YAML file, or a sweep folder to "
                                      "continue); finished cells are skipped, interrupted ones resumed")
    sw.add_argument("grid", metavar="GRID", help="a shipped grid (see `adakd sweeps`), a grid YAML file, or the "
                                                 "folder of a sweep to continue")
    sw.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="applied to every cell, e.g. data.root=PATH")
    sw.add_argument("--out", default=None, help="the sweep folder (default runs/sweep-<grid>)")
    sw.add_argument("--jobs", type=int, default=1, help="cells at once (local: GPUs or CPU cores are shared out; "
                                                        "slurm: the job array's parallelism)")
    sw.add_argument("--launcher", choices=("local", "slurm"), default="local")
    sw.add_argument("--dry-run", action="store_true", help="validate and list every cell; run nothing")
    sw.add_argument("--retry-failed", action="store_true", help="run failed cells again (else they are listed)")
    sw.add_argument("--wait", action="store_true", help="if another `adakd sweep` is running on the folder, wait "
                                                        "for it to end instead of stopping")
    sw.add_argument("--teacher", action="append", default=[], metavar="NAME=PATH",
                    help="a teacher's checkpoint (repeatable); teachers not given are trained by the sweep first")
    sw.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                    help="submitit settings, e.g. slurm_partition=gpu timeout_min=600 gpus_per_node=1 "
                         "(cluster=local runs the jobs on this machine)")
    sub.add_parser("sweeps", help="list the shipped grids with their cell counts")
    te = sub.add_parser("teachers", help="the published teachers (CIFAR-100: the CRD benchmark's; ImageNet: "
                                         "torchvision's): list them, fetch them, score them")
    te.add_argument("--dir", default=None, help="the teachers folder (default $ADAKD_TEACHERS, else the adakd "
                                                "cache's teachers/)")
    te_sub = te.add_subparsers(dest="teachers_action")
    tf = te_sub.add_parser("fetch", help="download, unpack, strict-load and record the named teachers")
    tf.add_argument("names", nargs="*", metavar="NAME", help="published teachers (see `adakd teachers`)")
    tf.add_argument("--all", action="store_true", help="every published teacher")
    tf.add_argument("--dir", default=argparse.SUPPRESS, help="the teachers folder (default $ADAKD_TEACHERS, else "
                                                             "the adakd cache's teachers/)")
    tf.add_argument("--url", default=None, help="the teachers archive (a mirror's URL, a file:// URL or a local "
                                                "path; default $ADAKD_TEACHERS_URL, else mdistiller's release)")
    tv = te_sub.add_parser("verify", help="score fetched teachers on their test split beside the published top-1")
    tv.add_argument("names", nargs="*", metavar="NAME_OR_KEY=VALUE",
                    help="teachers to score (default: every fetched one) and overrides, e.g. data.root=PATH")
    tv.add_argument("--dir", default=argparse.SUPPRESS, help="the teachers folder")
    tb = sub.add_parser("table", help="a sweep's results as the paper lays them out, beside the published numbers")
    tb.add_argument("sweep_dir")
    tb.add_argument("--metric", choices=("last", "best"), default="last")
    tb.add_argument("--format", choices=("md", "csv", "latex"), default="md")
    tb.add_argument("--topk", type=int, choices=(1, 5), default=1)
    cp = sub.add_parser("compare", help="runs side by side (last, best) and their test accuracy in one PNG")
    cp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    cp.add_argument("--out", default=None, help="the PNG file (default compare.png)")
    me = sub.add_parser("methods", help="list every distiller (with its default weights and spots), strategy and "
                                        "adaptive component, each with what it does")
    me.add_argument("pattern", nargs="?", default="*", help="a name pattern, e.g. 'd*' (default: all)")
    pr = sub.add_parser("presets", help="list the shipped presets, or show one")
    pr.add_argument("name", nargs="?", help="a preset to show as YAML (its base presets merged in)")
    de = sub.add_parser("decisions", help="training samples a trained SAKD policy does not distill at a spot")
    de.add_argument("run_dir")
    de.add_argument("--spot", default="0", help="decision index (0 = first spot) or spot name (e.g. stage2, logits)")
    pl = sub.add_parser("plot", help="draw a run's curves (losses, accuracy, SAKD spot shares, ABL weights and "
                                     "per-block accuracy) as PNG files")
    pl.add_argument("run_dir", help="a run folder, an `adakd abl` folder (each stage is plotted) or a sweep folder "
                                    "(Δ per cell with error bars)")
    pl.add_argument("--compare", nargs="+", action="extend", default=[], metavar="OTHER_RUN_DIR",
                    help="ABL runs whose per-block accuracy is drawn beside RUN_DIR's in block_accuracy.png")
    pl.add_argument("--out", default=None, help="folder for the PNG files (default RUN_DIR/plots; for an "
                                                "`adakd abl` folder OUT/<stage>, default <stage>/plots)")
    return parser


def _run(args: argparse.Namespace, task: str) -> int:
    from adakd.engine.config import ConfigError, dump_yaml, resolve
    from adakd.engine.trainer import Trainer

    overrides = list(args.overrides)
    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume takes the run's saved config; drop --preset/--config and give only "
                              "KEY=VALUE overrides (e.g. optim.epochs=300)")
        trainer = Trainer.resume(args.resume, overrides)
    else:
        config = resolve(["cifar100", *args.preset], args.config, [f"task={task}", *overrides])
        if args.print_config:
            print(dump_yaml(config), end="")
            return 0
        trainer = Trainer(config)
    _watch_run(task, trainer.run.path)
    summary = trainer.fit()
    if trainer.dist.is_main:
        print(format_summary(summary))
    return 0


# `adakd abl` is the two-stage pipeline (experiments/pipeline.py) of this strategy: its search, then the final runs.
ABL_PIPELINE = {"strategy": "abl", "command": "adakd abl"}


def _abl(args: argparse.Namespace) -> int:
    from adakd.experiments.pipeline import format_pipeline, pipeline_root, run_pipeline
    from adakd.engine.config import ConfigError, dump_yaml, resolve

    if args.resume:
        if args.preset or args.config or args.overrides:
            raise ConfigError("`adakd abl --resume ROOT` takes the saved pipeline.yaml; drop every --preset, "
                              "--config and KEY=VALUE")
        _watch_run("abl", Path(args.resume))
        result = run_pipeline(None, root=args.resume, resume=True, **ABL_PIPELINE)
    else:
        config = resolve(["cifar100", *args.preset], args.config, ["task=distill", *args.overrides])
        if args.print_config:
            print(dump_yaml(config), end="")
            return 0
        _watch_run("abl", pipeline_root(config, ABL_PIPELINE["strategy"]))
        result = run_pipeline(config, seeds=args.seeds, **ABL_PIPELINE)
    print(format_pipeline(result))
    return 0


def format_summary(summary: dict) -> str:
    """Two labelled lines: last-epoch and best-epoch test accuracy (top-5 only with more than 5 classes)."""
    from adakd.engine.loop import top5_text

    return (f"run: {summary['run_dir']}\n"
            f"last epoch ({summary['epochs']}): top-1 {summary['last_acc1']:.2f}%"
            f"{top5_text(summary.get('last_acc5'))}\n"
            f"best epoch ({summary['best_epoch']}): top-1 {summary['best_acc1']:.2f}%"
            f"{top5_text(summary.get('best_acc5'))}  (selected on the test split; report 'last' for comparisons)")


def pipeline_folder_hint(root: Path) -> str:
    """Why `adakd eval` cannot score a pipeline folder (`adakd abl`, a sweep's pipeline cell) itself, and the run
    folders inside it that it can."""
    finals = sorted((p.name for p in root.glob("final_seed*") if p.is_dir()),
                    key=lambda name: (len(name), name))  # final_seed2 before final_seed10
    runs = [*finals, *(["search"] if (root / "search").is_dir() else [])]
    listed = ", ".join(f"{name}/" for name in runs) or "none yet (resume it with `adakd abl --resume`)"
    example = root / (finals[0] if finals else "final_seed0")
    return (f"{str(root)!r} is an `adakd abl` pipeline folder (pipeline.yaml), not a run: it holds the search "
            f"run (search/) and the final runs (final_seed<k>/); score a final run, e.g. `adakd eval {example}` (runs "
            f"here: {listed})")


def _eval(args: argparse.Namespace) -> int:

    from adakd import data, models
    from adakd.engine.config import from_dict, merge, parse_override, resolve
    from adakd.engine.checkpoint import load_run_checkpoint
    from adakd.engine.distributed import pick_device
    from adakd.engine.loop import evaluate, top5_text
    from adakd.engine.preprocessing import with_pretrained_preprocessing
    from adakd.engine.build import build_run
    from adakd.models.checkpoint import CheckpointError

    target = Path(args.target)
    overrides = list(args.overrides)
    weights = target
    epoch = None
    if target.is_dir():
        weights = target / f"{args.checkpoint}.pth"
        if not weights.is_file() and (target / "pipeline.yaml").is_file():
            raise CheckpointError(pipeline_folder_hint(target))
        if not weights.is_file():
            other = "best" if args.checkpoint == "last" else "last"
            fix = (f"score {other}.pth with --checkpoint {other}" if (target / f"{other}.pth").is_file() else
                   f"it has no {other}.pth either (--checkpoint {other}): give a run folder that finished an "
                   "epoch")
            raise CheckpointError(f"{str(weights)!r} does not exist: run folder {str(target)!r} has no "
                                  f"{args.checkpoint}.pth; {fix}, or give a checkpoint file")
        state = load_run_checkpoint(weights)
        values, epoch = state["config"], state.get("epoch")
        for text in overrides:
            values = merge(values, parse_override(text))
        config = from_dict(values)
    else:
        # A run folder's config already holds the preprocessing it trained with; a preset does not.
        config = with_pretrained_preprocessing(resolve(["cifar100", *args.preset], None, overrides))[0]
    # Built by training's own builder (input channels, width multiplier, model.args, timm/torchvision source), so
    # what eval scores cannot drift from what was trained; the checkpoint given here replaces any start weights.
    run = build_run(config, parts=("test", "student"), start_weights=())
    test_set, model = run.test_set, run.student.model
    # A run's own checkpoint keeps the student under 'model'; model.weights_key chose among the entries of the file
    # the run started from, so it applies only to a checkpoint file given here.
    models.load_weights(model, weights, model_name=config.model.name, config_key="model", on_note=print,
                        weights_key=None if target.is_dir() else config.model.weights_key)
    device = pick_device(config.device)
    model.to(device)
    loader = data.make_loader(test_set, config.data.test_batch_size, train=False, device=device,
                              num_workers=config.data.num_workers)
    result = evaluate(model, loader)
    # Name the epoch that was scored: last and best differ, and only 'last' is a fair comparison.
    which = f", {args.checkpoint} epoch ({epoch})" if epoch is not None else ""
    print(f"{config.model.name} on {config.data.name} test ({len(test_set)} images) from {weights}{which}: "
          f"top-1 {result['acc1']:.2f}%{top5_text(result.get('acc5'))}  loss {result['loss']:.4f}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import json

    from adakd.engine.export import ExportError, card_paths, export_student

    if (Path(args.run_dir) / "pipeline.yaml").is_file():
        raise ExportError(f"{str(args.run_dir)!r} is an `adakd abl` pipeline folder, not a run; export one of its "
                          f"final runs, e.g. `adakd export {Path(args.run_dir) / 'final_seed0'}`")
    path = export_student(args.run_dir, checkpoint=args.checkpoint, format=args.format, out=args.out,
                          force=args.force, latency_batch=args.latency_batch)
    json_path, md_path = card_paths(path)
    card = json.loads(json_path.read_text())
    scored = card["accuracy"]["exported_checkpoint"]
    score = f", test top-1 {scored['top1']:.2f}%" if scored else ""
    print(f"exported student {card['architecture']['name']} ({card['exported_from']['checkpoint']}, epoch "
          f"{card['exported_from']['epoch']}{score}) as {card['file_format']} to {path}")
    print(f"model card: {json_path} and {md_path}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from adakd import models

    if args.source != "zoo":
        names = models.available(args.pattern, source=args.source)
        print("\n".join(names))
        print(f"{len(names)} {args.source} models; use one as model.name={names[0] if names else 'timm:NAME'} "
              "(random init; model.pretrained=true for the published ImageNet weights, or a file with "
              "model.weights=PATH)", file=sys.stderr)
        return 0
    print(f"{'name':<14}{'params':>13}  feature shapes (stem, stages..., pooled, logits)")
    for name in models.available(args.pattern):
        imagenet = name in ("resnet18", "resnet34", "resnet50", "mobilenetv1")
        classes = args.num_classes or (1000 if imagenet else 100)
        size = args.input_size or (224 if imagenet else 32)
        model = models.create(name, num_classes=classes)
        shapes = models.staged(model).feature_shapes((3, size, size))
        text = " | ".join("x".join(map(str, s)) for s in shapes)
        print(f"{name:<14}{sum(p.numel() for p in model.parameters()):>13,}  {text}")
    return 0


def _teachers(args: argparse.Namespace) -> int:
    from adakd.download import DownloadError
    from adakd.engine.config import ConfigError
    from adakd.models import teachers

    action = getattr(args, "teachers_action", None)
    try:
        if action is None:
            print(teachers.listing(args.dir))
            return 0
        if action == "fetch":
            if args.all == bool(args.names):
                raise ConfigError("name the teachers to fetch (see `adakd teachers`) or give --all, not both")
            names = list(teachers.PUBLISHED) if args.all else args.names
            for item in teachers.fetch(names, args.dir, url=args.url):
                print(f"{item.name}: {'already here' if item.already else 'fetched'}: {item.path}")
            folder = teachers.teachers_dir(args.dir)
            if folder not in teachers.search_dirs():  # a --dir that runs do not look in by themselves
                print(f"runs find teachers in {folder} with ADAKD_TEACHERS={folder} set")
            return 0
        from adakd.experiments.teacher_scores import verify

        names = [item for item in args.names if "=" not in item]
        verify(names, [item for item in args.names if "=" in item], args.dir)
        return 0
    except DownloadError as err:  # no network, refused, cut: one line, as every bad input
        print(f"adakd: error: {err}", file=sys.stderr)
        return 2


def _key_values(items: list[str], option: str) -> dict[str, object]:
    """`--teacher resnet56=PATH` / `--slurm timeout_min=60` as a mapping (values read as YAML)."""
    import yaml

    from adakd.engine.config import ConfigError

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} {item!r} must look like NAME=VALUE")
        out[key] = value if option == "--teacher" else yaml.safe_load(value)
    return out


def _sweep(args: argparse.Namespace) -> int:
    from adakd.engine.config import ConfigError
    from adakd.experiments.launch import run_sweep

    if args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    failed, root = run_sweep(args.grid, list(args.overrides), out=args.out, jobs=args.jobs, launcher=args.launcher,
                             dry_run=args.dry_run, retry_failed=args.retry_failed,
                             teachers=_key_values(args.teacher, "--teacher"),
                             slurm=_key_values(args.slurm, "--slurm"), watch=_watch_sweep, wait=args.wait)
    return 1 if failed else 0


def first_paragraph(docstring: str | None, limit: int = 110) -> str:
    """A docstring's first paragraph on one line, cut to `limit` characters."""
    paragraph = " ".join((docstring or "").strip().split("\n\n")[0].split())
    return paragraph if len(paragraph) <= limit else paragraph[:limit - 1].rstrip() + "…"


def spot_text(spot: int | str) -> str:
    """A distiller's default spot in words: -1 logits, -2 pooled, -3 last stage, 0 stem, k stage k."""
    if spot == "stages":
        return "every stage"
    return {-1: "logits", -2: "pooled", -3: "last stage", 0: "stem"}.get(spot, f"stage{spot}")


def _methods(args: argparse.Namespace) -> int:
    from adakd import distillers, strategies
    from adakd.strategies import components

    rows = [("distillers (distill.method=NAME; CE / method weight and default spots, set by distill.ce_weight, "
             "distill.method_weight, distill.spots)",
             [(name, f"{distillers.get(name).defaults.ce_weight:g} / {distillers.get(name).defaults.method_weight:g}",
               " + ".join(spot_text(s) for s in distillers.get(name).defaults.spots), distillers.get(name))
              for name in distillers.available(args.pattern)]),
            ("strategies (strategy=NAME)", [(name, "", "", strategies.get(name))
                                             for name in strategies.available(args.pattern)]),
            ("adaptive components (components.NAME=true, beside a strategy)",
             [(name, "", "", components.COMPONENTS.get(name)) for name in components.available(args.pattern)])]
    if not any(found for _, found in rows):
        print(f"adakd: error: no distiller, strategy or component matches {args.pattern!r}; `adakd methods` lists "
              "them all", file=sys.stderr)
        return 2
    for heading, found in rows:
        if found:
            print(f"{heading}:")
        width = max((len(name) for name, *_ in found), default=0)
        for name, weights, spots, cls in found:
            columns = f"{weights:<12} {spots:<22} " if weights else ""
            print(f"  {name:<{width}}  {columns}{first_paragraph(cls.__doc__)}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    import yaml

    from adakd.engine.config import load_preset, preset_names

    if args.name is None:
        print("\n".join(preset_names()))
        print("\n`adakd presets NAME` shows one; apply it with --preset NAME (repeatable, later ones win)")
        return 0
    print(f"# preset {args.name} (base presets merged in); apply with --preset {args.name}")
    print(yaml.safe_dump(load_preset(args.name), sort_keys=False), end="")
    return 0


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv with KEY=VALUE overrides allowed anywhere, also after options (`--preset demo epochs=3`)."""
    args, extra = parser.parse_known_args(argv)
    stray = [token for token in extra if token.startswith("-") or "=" not in token]
    if stray or (extra and not hasattr(args, "overrides")):
        hint = ("; config values are set as KEY=VALUE without dashes, e.g. epochs=3 or optim.lr=0.01"
                if any(token.startswith("--") for token in stray) else "")
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}{hint}")
    if extra:
        args.overrides = [*args.overrides, *extra]  # in the order given: later overrides win
    return args


# What a Ctrl-C should tell the user: set once a run folder exists.
_RESUME_HINT: dict[str, str] = {}


def _watch_run(command: str, run_dir: Path) -> None:
    """Remember how to continue `run_dir` if the user interrupts it (or the disk fills up)."""
    _RESUME_HINT["command"] = f"adakd {command} --resume {run_dir}"
    _RESUME_HINT["text"] = (f"Continue with `adakd {command} --resume {run_dir}` (it restarts the interrupted epoch "
                            "from the last finished one; a run stopped before its first epoch ended must be "
                            "started again)")


def _watch_sweep(_command: str, root: Path) -> None:
    """Remember how to continue a sweep if the user interrupts it."""
    _RESUME_HINT["text"] = (f"Continue with `adakd sweep {root}`: finished cells are kept, interrupted ones resume "
                            "from their last epoch")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, SLURM and `kill` send), raised in the main thread to stop a run as Ctrl-C does."""


def _stop_on_sigterm() -> object:
    """Make SIGTERM raise Terminated in this process; returns the handler to restore afterwards (None when this is
    not the main thread, where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    stopping: list[int] = []

    # Forked DataLoader workers inherit the handler: there too it stops them as Ctrl-C does, so they end cleanly
    # (killed by the signal, they would make the main process print a traceback at exit).
    def handler(signum: int, frame: object) -> None:
        if stopping:  # `timeout` signals the process, then its whole group: one stop is enough
            return
        stopping.append(signum)
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _line_buffered_stdout() -> None:
    """Flush stdout at each newline: redirected to a file or pipe, Python block-buffers it, and a run's lines
    then reached its log only minutes later."""
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError, OSError):  # no stdout (pythonw), or a stream that cannot be reconfigured
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `adakd` console script; bad input exits 2 with one clear line."""
    _line_buffered_stdout()
    _RESUME_HINT.clear()  # a hint is about the run this call starts, not an earlier call in the same process
    from adakd.data import DatasetError
    from adakd.download import DownloadError
    from adakd.engine.config import ConfigError
    from adakd.engine.loop import NonFiniteLossError
    from adakd.engine.runs import DiskFullError, RunDirError, one_line
    from adakd.models.auto_staged import AutoLayoutError
    from adakd.models.checkpoint import CheckpointError
    from adakd.models.external import ModelSourceError
    from adakd.registry import UnknownNameError

    parser = build_parser()
    args = parse_arguments(parser, argv)
    if args.version:
        import adakd

        print(adakd.__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    previous_sigterm = _stop_on_sigterm()
    try:
        if args.command in ("train", "distill"):
            return _run(args, args.command)
        if args.command == "eval":
            return _eval(args)
        if args.command == "export":
            return _export(args)
        if args.command == "abl":
            return _abl(args)
        if args.command == "models":
            return _models(args)
        if args.command == "presets":
            return _presets(args)
        if args.command == "methods":
            return _methods(args)
        if args.command == "decisions":
            from adakd.experiments.decisions import export_decisions

            path, skipped, spot = export_decisions(args.run_dir, args.spot)
            print(f"{len(skipped)} training samples are not distilled at {spot}; every decision is in {path}")
            print(" ".join(map(str, skipped)))
            return 0
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "teachers":
            return _teachers(args)
        if args.command == "sweeps":
            from adakd.experiments.launch import describe_grids

            print(describe_grids())
            return 0
        if args.command == "table":
            from adakd.experiments.sweep_report import format_table

            print(format_table(args.sweep_dir, args.metric, args.format, args.topk))
            return 0
        if args.command == "compare":
            from adakd.experiments.sweep_report import compare_runs

            print(compare_runs(args.runs, args.out)[0])
            return 0
        if args.command == "plot":
            from adakd.experiments.plots import PlottingUnavailable, plot_run
            from adakd.experiments.sweep_report import plot_sweep

            try:
                if (Path(args.run_dir) / "sweep.yaml").is_file():
                    paths = plot_sweep(args.run_dir, args.out)
                else:
                    paths = plot_run(args.run_dir, args.out, compare=args.compare)
            # A run without epochs, a --compare run that is not ABL, or no matplotlib.
            except (ValueError, PlottingUnavailable) as err:
                print(f"adakd: error: {err}", file=sys.stderr)
                return 2
            for path in paths:
                print(path)
            return 0
        if args.command == "demo":
            from adakd.experiments.demo import run_demo

            if args.seeds < 1:
                raise ConfigError("--seeds must be >= 1")
            text, failed = run_demo(args.out, list(args.overrides), seeds=args.seeds, jobs=args.jobs)
            print(text)
            return 1 if failed else 0
    except DiskFullError as err:  # before RunDirError, its base class: the resume command is the one this CLI ran
        print(f"adakd: error: {err.describe(_RESUME_HINT.get('command'))}", file=sys.stderr)
        return 2
    except (ConfigError, DatasetError, CheckpointError, RunDirError, UnknownNameError, FileNotFoundError,
            ModelSourceError, AutoLayoutError, DownloadError) as err:
        print(f"adakd: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # SIGTERM stops a run as Ctrl-C does; the exit status follows the shell's 128 + signal number (15, 2).
        stopped, status = ("terminated (SIGTERM)", 143) if isinstance(err, Terminated) else ("interrupted", 130)
        print(f"adakd: {stopped}. {_RESUME_HINT.get('text', 'Nothing was started.')}", file=sys.stderr)
        return status
    except NonFiniteLossError as err:
        print(f"adakd: error: {err}. The last good checkpoint is kept; lower optim.lr or check the data.",
              file=sys.stderr)
        return 3
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return 2


if __name__ == "__main__":
    sys.exit(main())
