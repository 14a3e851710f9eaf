"""``edgeloop train | export | predict``: the shared ML core from the command line."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

from edge_agent.datasets import IMAGE_SUFFIXES

# torch-free so that `edgeloop --help` stays fast; the factories check the names and list the valid ones.
ARCHITECTURE_NAMES = "slim_resnet, slim_resnet_small, resnet18, mobilenet_v3_small, tiny_cnn"
POLICY_NAMES = "none, flips, contrast, geometric, noise, el, strong"


def add_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model on a dataset version")
    train.add_argument("--data", required=True, help="dataset version folder")
    train.add_argument("--arch", default="slim_resnet", help=ARCHITECTURE_NAMES)
    train.add_argument("--out", required=True, help="folder for model.pt and metrics.json")
    train.add_argument("--init", help="fine-tune this checkpoint instead of starting from scratch")
    # Unset knobs fall back to TrainConfig's defaults (one place for them; no torch import here).
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--label-smoothing", type=float)
    train.add_argument("--class-balance", choices=["none", "weighted"], help="weighted: inverse class frequency")
    train.add_argument("--ema-decay", type=float, help="keep and return an exponential moving average of the weights")
    train.add_argument("--optimizer", choices=["adamw", "sgd"])
    train.add_argument("--schedule", choices=["onecycle", "cosine", "constant"])
    train.add_argument("--policy", help=f"augmentation policy: {POLICY_NAMES}")
    train.add_argument("--seed", type=int)
    train.add_argument("--threads", type=int, help="default: every core")
    train.add_argument("--time-budget", dest="time_budget_s", type=float, help="seconds; best weights so far are kept")
    train.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: a CUDA GPU when there is one")
    train.add_argument("--image-size", type=int, help="train on images resized to this size (default: the dataset's)")
    parallel = train.add_argument_group("distributed (torch.distributed, DDP)")
    parallel.add_argument("--nproc-per-node", type=int, default=1, help="ranks on this host (default 1: no DDP)")
    parallel.add_argument("--nnodes", type=int, default=1, help="hosts in the job; each runs this same command")
    parallel.add_argument("--rdzv-endpoint", help="HOST:PORT where the hosts meet (needed with --nnodes > 1)")
    parallel.add_argument("--rdzv-id", help="job id, the same on every host (default: a new one)")
    parallel.add_argument("--oversubscribe", action="store_true",
                          help="allow --nproc-per-node above this host's cores (they would only slow each other)")
    # the settings as one JSON: how the launcher hands them to its ranks, and the cloud to its trainers
    train.add_argument("--config-json", help=argparse.SUPPRESS)
    train.set_defaults(func=_train)

    export = sub.add_parser("export", help="export a trained model to ONNX (optionally INT8)")
    export.add_argument("--model", required=True, help="training output folder (or its model.pt)")
    export.add_argument("--out", required=True, help="FILE.onnx")
    export.add_argument("--int8", action="store_true", help="also write an INT8 graph (FILE.int8.onnx)")
    export.add_argument("--calibration", help="dataset version for INT8 calibration and the accuracy report")
    export.set_defaults(func=_export)

    predict = sub.add_parser("predict", help="classify images with an ONNX model; one JSON line per image")
    predict.add_argument("--model", required=True, help="FILE.onnx")
    predict.add_argument("paths", nargs="+", help="image files or folders")
    predict.set_defaults(func=_predict)


def _train(args: argparse.Namespace) -> int:
    from edge_agent.datasets import open_dataset
    from edge_agent.train import TrainConfig
    from orchestrator.distributed import Launch, RankFailed, launch, torch_distributed_rank

    knobs = {name: getattr(args, name) for name in TrainConfig.model_fields if getattr(args, name, None) is not None}
    config = TrainConfig.model_validate_json(args.config_json) if args.config_json else TrainConfig(**knobs)
    spec = Launch(args.nproc_per_node, args.nnodes, args.rdzv_endpoint, args.rdzv_id, args.oversubscribe)
    if not spec.distributed or torch_distributed_rank():  # alone, or a rank the launcher started
        return _train_here(args, config)
    open_dataset(args.data)  # a missing or broken dataset is one clear error here, not one per rank
    rank_args = ["-m", "edgeloop", "train", "--data", args.data, "--arch", args.arch, "--out", args.out,
                 "--config-json", config.model_dump_json()]
    rank_args += ["--init", args.init] if args.init else []
    rank_args += ["--image-size", str(args.image_size)] if args.image_size else []
    try:
        launch(spec, rank_args)
    except RankFailed as exc:
        print(f"edgeloop train: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _train_here(args: argparse.Namespace, config) -> int:
    """Train in this process: alone, or as one rank of a job the launcher started."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from orchestrator.distributed import process_group
    from orchestrator.progress import Progress
    from orchestrator.training import train_on_dataset

    # the epoch lines on stdout (the trainers' progress reads them); on a terminal, a bar with time left below
    main_rank = os.environ.get("RANK", "0") == "0"
    bar = Progress(config.epochs, "epochs", f"training {args.arch}", log=lambda line: print(line, flush=True),
                   stream=sys.stderr if main_rank else io.StringIO())

    def progress(m) -> None:
        bar.update(m.epoch, f"epoch {m.epoch:>3}/{config.epochs}  loss {m.train_loss:.4f}  acc {m.train_acc:.3f}  "
                            f"val_loss {m.val_loss:.4f}  val_acc {m.val_acc:.3f}  {m.seconds:.1f}s")

    @record  # a rank's exception goes to the launcher, which names it in its error
    def run() -> dict:
        return train_on_dataset(args.data, args.arch, args.out, config, init=args.init, image_size=args.image_size,
                                on_epoch=progress, group=lambda: process_group(config.device))

    with bar:
        metrics = run()
    if metrics:  # rank 0, or the only process
        print(f"best val_acc {metrics['val_acc']:.4f} (epoch {metrics['best_epoch']}), test_acc "
              f"{metrics['test_acc']:.4f}; wrote {Path(args.out) / 'model.pt'}", flush=True)
    return 0


def _checkpoint_path(model: str) -> Path:
    path = Path(model)
    return path / "model.pt" if path.is_dir() else path


def _export(args: argparse.Namespace) -> int:
    from edge_agent.datasets import open_dataset
    from orchestrator.training import export_checkpoint, max_abs_difference, quantize_with_report

    if args.int8 and not args.calibration:
        raise ValueError("--int8 needs --calibration DIR (a dataset version)")
    checkpoint = _checkpoint_path(args.model)
    out = export_checkpoint(checkpoint, args.out)
    report: dict = {"onnx": str(out)}
    if args.calibration:
        dataset = open_dataset(args.calibration)
        check = dataset.load_split("test", _load_size(checkpoint)).images[:64]
        report["max_abs_difference_vs_torch"] = max_abs_difference(checkpoint, out, check)
    if args.int8:
        int8 = out.with_suffix(".int8.onnx")
        report.update(int8=str(int8), **quantize_with_report(out, int8, args.calibration))
    print(json.dumps(report, indent=1))
    return 0


def _load_size(checkpoint: Path) -> int:
    from edge_agent.models import load_checkpoint

    return load_checkpoint(checkpoint)[1].spec.image_size


def _expand(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(path)
    return files


def _predict(args: argparse.Namespace) -> int:
    from edge_agent.onnx_model import OnnxClassifier, predict_files

    classifier = OnnxClassifier(args.model)
    read = 0
    for result in predict_files(classifier, _expand(args.paths)):
        read += "error" not in result
        print(json.dumps(result), flush=True)
    if not read:
        print("edgeloop predict: no image could be read", file=sys.stderr)
        return 1
    return 0
