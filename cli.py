"""``defectkit``: one command for the whole suite, in the shape Ultralytics' ``yolo`` and anomalib's
``anomalib`` have taught users.

    defectkit data split --data /data/mvtec --category bottle
    defectkit convert --data /data/mvtec --category bottle
    defectkit train anomaly --config configs/demo/anomaly.yaml --epochs 20
    defectkit train yolo --data work/out/<data>/converted/<cat>-defect/yolo/data.yaml mosaic=0.5
    defectkit train sam --data work/out/<data>/converted/<cat>-defect --config configs/demo/sam.yaml
    defectkit val --run work/runs/anomaly/<run>/<category> --split all
    defectkit predict --run work/runs/anomaly/<run>/<category> --images 'line/*.png'
    defectkit export --run ...
    defectkit compare --gt .../ground_truth.jsonl --runs work/runs/yolo/<run> work/runs/anomaly/<run>
    defectkit app --gt .../ground_truth.jsonl --runs ... --launch
    defectkit bench {convert,predict,anomaly,sam} ...
    defectkit cfg train sam --config configs/demo/sam.yaml     # the configuration a command would run

Each subcommand is the same code as its script or module (``python finetune/yolo.py`` and ``python -m
defectkit.converters`` keep working) and takes the same flags; ``defectkit <command> --help`` lists
them with their defaults.  Every command understands ``--config FILE`` (a YAML recipe, or a run's own
``config.yaml``); flags given on the command line win over it.
"""

from __future__ import annotations

import importlib
import sys

import yaml

# command -> (module, what it does); a module's ``cli(argv)`` (or ``main(argv)`` for the benchmarks) runs it
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("defectkit.datasets.__main__", "datasets: generate | validate | stats | split | synth-defects | demo"),
    "convert": ("defectkit.converters.__main__", "masks -> YOLO, YOLO-seg, COCO, VOC, label maps, with fidelity"),
    "val": ("defectkit.deploy.validate", "re-score a trained run (anomaly, YOLO, SAM): its fold, all, other data"),
    "predict": ("defectkit.deploy.__main__", "OK/NG, maps, boxes, overlays and a CSV for new images"),
    "export": ("defectkit.deploy.__main__", "ONNX export of a run, checked against PyTorch"),
    "compare": ("defectkit.review.compare", "score runs side by side on the test fold: table, JSON, HTML"),
    "app": ("defectkit.review.fiftyone_dataset", "the FiftyOne dataset of runs, and the App on 127.0.0.1"),
}
TRAIN = {
    "anomaly": ("defectkit.anomaly.train", "autoencoders, VAE, DRAEM, OCSVM, PatchCore on good images"),
    "yolo": ("defectkit.finetune.yolo", "YOLO-World and YOLO through Ultralytics"),
    "sam": ("defectkit.finetune.sam", "SAM on box prompts, and the detect-then-segment cascades"),
}
BENCH = {
    "convert": ("defectkit.converters.bench_convert", "conversion speed against decoding the masks"),
    "predict": ("defectkit.deploy.bench_predict", "images/s of a run through PyTorch and onnxruntime"),
    "anomaly": ("defectkit.anomaly.bench_models", "every reconstruction model on one category"),
    "sam": ("defectkit.finetune.bench_sam_cache", "a SAM decoder epoch with and without the embedding cache"),
}
#: ``defectkit data index`` / ``synth``: the names users look for, for the datasets module's commands
DATA_ALIASES = {"index": "validate", "synth": "synth-defects"}


def _usage() -> str:
    lines = [__doc__.split("\n\n")[0], "", "commands:"]
    lines += [f"  {name:<9} {what}" for name, (_, what) in COMMANDS.items() if name not in ("export",)]
    lines += [f"  train {name:<7} {what}" for name, (_, what) in TRAIN.items()]
    lines += ["  export    ONNX export of a run, checked against PyTorch",
              "  bench     " + ", ".join(BENCH) + ": speed figures as ratios, one run",
              "  cfg       print the configuration a command would run with (defectkit cfg train sam ...)",
              "", "defectkit <command> --help shows a command's flags and defaults."]
    return "\n".join(lines)


def _run(module: str, argv: list[str]) -> int:
    from defectkit.core.cli import run_cli

    mod = importlib.import_module(module)
    if hasattr(mod, "cli"):
        return int(mod.cli(argv) or 0)
    if hasattr(mod, "get_args_parser"):
        return run_cli(mod.get_args_parser(), mod.main, argv)
    mod.main(argv)  # a benchmark that parses its own arguments
    return 0


def resolve(argv: list[str]) -> tuple[str, list[str]]:
    """``(module, its arguments)`` for a ``defectkit`` command line; SystemExit with the usage otherwise."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    cmd, rest = argv[0], argv[1:]
    groups = {"train": TRAIN, "bench": BENCH}
    if cmd in groups:
        table = groups[cmd]
        if not rest or rest[0] not in table:
            print(f"usage: defectkit {cmd} {{{','.join(table)}}} [flags]\n" + "\n".join(
                f"  {n:<8} {w}" for n, (_, w) in table.items()), file=sys.stderr if rest else sys.stdout)
            raise SystemExit(2 if rest and rest[0] not in ("-h", "--help") else 0)
        return table[rest[0]][0], rest[1:]
    if cmd == "data" and rest and rest[0] in DATA_ALIASES:
        rest = [DATA_ALIASES[rest[0]], *rest[1:]]
    if cmd in ("predict", "export"):
        rest = [cmd, *rest]
    if cmd not in COMMANDS:
        print(f"defectkit: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    return COMMANDS[cmd][0], rest


def print_config(argv: list[str]) -> int:
    """``defectkit cfg <command> [flags]``: the resolved flag values as YAML, nothing run."""
    from defectkit.core.cli import parse
    from defectkit.core.config import plain
    from defectkit.core.errors import DefectkitError

    module, rest = resolve(argv)
    mod = importlib.import_module(module)
    if not hasattr(mod, "get_args_parser"):
        print(f"defectkit cfg: {' '.join(argv[:2])} has no configuration to show", file=sys.stderr)
        return 2
    try:
        args = parse(mod.get_args_parser(), rest)
    except DefectkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump({k: plain(v) for k, v in vars(args).items() if k != "config"}, sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "cfg":
        return print_config(argv[1:])
    module, rest = resolve(argv)
    return _run(module, rest)


if __name__ == "__main__":
    raise SystemExit(main())
