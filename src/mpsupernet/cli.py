"""The `mpsupernet` command: convert, train, search, latency models, extract, export, push and the demo.

Heavy imports (the models, training, search) happen inside each command, so that `mpsupernet --help` stays quick.
"""

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .choices import DATASET_SCHEMA_NAMES, EXPORT_TARGETS, TASKS, WEIGHT_CONTAINERS


class SourceError(Exception):
    """A folder, file or Hub id given on the command line that cannot be found or loaded (exit status 2)."""


class HubError(Exception):
    """The Hub refused a request or could not be reached (exit status 1: the input was fine, the remote was not)."""


@contextmanager
def talking_to_the_hub(repo_id: str):
    """Turns a failed Hub request (an HTTP error status, a refused or timed-out connection) into a one-line
    `HubError` naming the repository and the cause, instead of a traceback through huggingface_hub's HTTP client."""
    # huggingface_hub re-exports its HTTP client's base error (httpx's, or httpx2's in 2.x): the base of the
    # client's connection errors and of `HfHubHTTPError`.
    from huggingface_hub.errors import HTTPError

    try:
        yield
    except (HTTPError, OSError) as error:
        cause = next(iter(str(error).strip().splitlines()), "") or "no message"
        raise HubError(f"could not push to the Hub repository {repo_id!r}: {type(error).__name__}: {cause}") from None


@contextmanager
def loading(option: str, value: str, hub: bool = True, shipped_sams: bool = False):
    """Turns the failure to find or load `value` into a one-line `SourceError` naming the option and the path.

    A mistyped folder is taken for a Hub id by transformers and datasets, and fails deep inside them (an `OSError`:
    "Repo id must be in the form ...", a failed download, a missing file); the user needs to know which argument.
    `hub` says whether the option also takes a Hub id, `shipped_sams` whether it also takes a shipped SAM's name (the
    message then lists them: a mistyped name is otherwise only reported as a missing Hub repository).
    """
    try:
        yield
    except OSError as error:
        lines = str(error).strip().splitlines()
        found = "exists but could not be read" if Path(value).exists() else "is no folder or file here"
        tried_hub = ", and could not be loaded as a Hub repository" if hub else ""
        detail = f" ({lines[0]})" if lines else ""
        names = ""
        if shipped_sams:
            from .pretrained import SHIPPED_SAM_NAMES

            names = f" The SAMs shipped in the package: {', '.join(SHIPPED_SAM_NAMES)}."
        raise SourceError(f"{option} {value!r} {found}{tried_hub}{detail}.{names}") from None


def load_dataset_splits(
    spec: str,
    schema: str = "standard",
    num_train: int = 64,
    num_validation: int = 32,
    seed: int = 0,
    task: str = "promptable",
    reduce_labels: bool = False,
):
    """Train and validation splits in the standard schema (`image`, `masks`, `image_id`), or for `task="semantic"`
    in the semantic schema (`image`, `annotation`; see `mpsupernet.data.semantic`).

    Args:
        spec (`str`): `"synthetic"` (the built-in dataset), a folder written by `Dataset.save_to_disk` /
            `DatasetDict.save_to_disk`, or a Hub dataset id for `datasets.load_dataset`.
        schema (`str`): how the dataset stores masks: `"standard"` (image + list of masks), `"coco"` (objects with
            polygon/RLE segmentations) or `"semantic"` (an ADE20K-style label map).
        num_train, num_validation (`int`): sizes of the synthetic splits, or of the split made when a dataset has
            no validation split.
        seed (`int`): seed of the synthetic data and of the split.
        task (`str`): `"promptable"` or `"semantic"` (the dataset keeps its label maps; `schema` is not used).
        reduce_labels (`bool`): for `task="semantic"`, apply ADE20K's label reduction (0 → 255, `c` → `c - 1`).
    """
    import datasets

    from .data import (
        DATASET_SCHEMAS,
        from_ade20k,
        make_synthetic_segmentation_dataset_dict,
        make_synthetic_semantic_dataset_dict,
        to_standard_schema,
    )

    if schema not in DATASET_SCHEMAS:
        raise ValueError(f"Unknown dataset schema {schema!r}; allowed: {list(DATASET_SCHEMAS)}.")
    semantic = task == "semantic"
    if spec == "synthetic":
        make = make_synthetic_semantic_dataset_dict if semantic else make_synthetic_segmentation_dataset_dict
        splits = make(num_train, num_validation, seed=seed)
        return splits["train"], splits["validation"]
    with loading("--dataset", spec):
        loaded = datasets.load_from_disk(spec) if Path(spec).exists() else datasets.load_dataset(spec)
    if semantic:
        loaded = from_ade20k(loaded) if reduce_labels else loaded
    else:
        loaded = to_standard_schema(loaded, schema)
    if isinstance(loaded, datasets.Dataset):
        split = loaded.train_test_split(test_size=min(num_validation, len(loaded) // 2), seed=seed)
        return split["train"], split["test"]
    validation = next((loaded[name] for name in ("validation", "val", "test") if name in loaded), None)
    if "train" not in loaded or validation is None:
        raise ValueError(f"Dataset {spec!r} has splits {list(loaded)}; it needs 'train' and 'validation' (or 'test').")
    return loaded["train"], validation


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="synthetic", help="'synthetic', a save_to_disk folder, or a Hub id")
    parser.add_argument(
        "--schema", default="standard", choices=DATASET_SCHEMA_NAMES, help="how the dataset stores masks (see README)"
    )
    parser.add_argument("--num-train", type=int, default=64, help="training images of the synthetic dataset")
    parser.add_argument("--num-validation", type=int, default=32, help="validation images")
    _add_task_argument(parser)
    parser.add_argument(
        "--reduce-labels", action="store_true", help="--task semantic: ADE20K's label reduction (0 → 255, c → c-1)"
    )
    parser.add_argument(
        "--num-labels", type=int, default=None,
        help="--task semantic with a new supernet: the classes (default: the synthetic dataset's, or 150 with --reduce-labels)",
    )


def _add_task_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task", default="promptable", choices=TASKS,
        help="promptable: masks for box and point prompts; semantic: a class per pixel, without prompts",
    )


def _dataset_splits(args):
    return load_dataset_splits(
        args.dataset, args.schema, args.num_train, args.num_validation, args.seed, args.task, args.reduce_labels
    )


def cmd_convert(args) -> None:
    from .modeling_sam_supernet import SamSupernetForMaskGeneration
    from .pretrained import load_sam

    overrides = {"lora_mode": args.lora_mode, "lora_rank": args.lora_rank}
    with loading("--sam", args.sam, shipped_sams=True):
        sam = load_sam(args.sam)
    supernet = SamSupernetForMaskGeneration.from_sam(sam, **overrides)
    supernet.save_pretrained(args.output_dir)
    print(f"Supernet saved to {args.output_dir}")


def _supernet_option(path: str, seed: int = 0, task: str = "promptable", num_labels: int | None = None):
    """The supernet `--supernet` names (see `mpsupernet.tasks.load_task_supernet`), or a `SourceError` naming the option. A shipped SAM
    becomes a new supernet of `task` (for `"semantic"`, with `num_labels` classes, by default the synthetic
    dataset's); a saved supernet must be of `task`."""
    from .pretrained import shipped_sam_name
    from .tasks import is_semantic, load_task_supernet

    if task == "semantic" and shipped_sam_name(path) is not None:
        from transformers import set_seed

        from .data import SYNTHETIC_SEMANTIC_ID2LABEL
        from .modeling_sam_semantic import SamSupernetForSemanticSegmentation
        from .pretrained import load_sam

        set_seed(seed)  # the adapters are initialised from torch's global generator, seeded per process at random
        classes = {"num_labels": num_labels} if num_labels else {"id2label": SYNTHETIC_SEMANTIC_ID2LABEL}
        return SamSupernetForSemanticSegmentation.from_sam(load_sam(shipped_sam_name(path)), **classes)
    with loading("--supernet", path, shipped_sams=True):
        supernet = load_task_supernet(path, seed)
    if is_semantic(supernet.config) != (task == "semantic"):
        found = "semantic" if is_semantic(supernet.config) else "promptable"
        raise ValueError(f"--supernet {path!r} is a {found} supernet, but --task is {task!r}; give --task {found}.")
    return supernet


def training_arguments(args):
    """The `SupernetTrainingArguments` of `mpsupernet train`'s options.

    Raises:
        `ValueError`: for a `--warmup-ratio` outside [0, 1).
    """
    import torch

    from .training.arguments import SupernetTrainingArguments

    if not 0 <= args.warmup_ratio < 1:
        raise ValueError(f"`--warmup-ratio` must be in [0, 1), got {args.warmup_ratio!r}.")
    return SupernetTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_ratio,  # below 1: a share of max_steps
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        num_random_subnets=args.num_random_subnets,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        bf16=args.mixed_precision == "bf16",
        fp16=args.mixed_precision == "fp16",
        # TrainingArguments refuses bf16 on a machine without an accelerator unless told it runs on the CPU.
        use_cpu=args.mixed_precision == "bf16" and not torch.cuda.is_available(),
        activation_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        resume_from_checkpoint=args.resume_from_checkpoint,
        save_strategy="no" if args.save_steps is None else "steps",
        save_steps=500 if args.save_steps is None else args.save_steps,
        logging_steps=10,
        report_to="none",
    )


def cmd_train(args) -> None:
    from .training.loop import train_supernet

    settings = training_arguments(args)
    train, validation = _dataset_splits(args)
    num_labels = args.num_labels or (150 if args.reduce_labels else None)
    supernet = _supernet_option(args.supernet, args.seed, args.task, num_labels)
    summary = train_supernet(supernet, train, validation, args=settings)
    print(json.dumps(summary, indent=2, default=str))


def _load_latency_model(path: str | None):
    if path is None:
        return None
    from .latency import LatencyModel

    with loading("--latency-model", path, hub=False):
        return LatencyModel.from_pretrained(path)


def cmd_latency_model(args) -> None:
    from .latency import BusyMachineError, fit_latency_model

    max_spread = None if args.max_spread.lower() == "none" else float(args.max_spread)
    try:
        model = fit_latency_model(
            _supernet_option(args.supernet, args.seed), runtime=args.runtime, num_threads=args.num_threads,
            num_subnets=args.num_subnets, rounds=args.rounds, max_spread=max_spread, seed=args.seed,
        )
    except BusyMachineError as error:
        raise ValueError(str(error)) from None  # a one-line refusal (exit status 2), as for bad arguments
    path = model.save_pretrained(args.output_dir)
    busy = " (busy machine: figures measured under load)" if model.busy else ""
    print(f"Latency model of {model.describe_machine()} saved to {path}; fit error {model.fit_error}{busy}")


def cmd_search(args) -> None:
    from .search import run_search

    _, validation = _dataset_splits(args)
    front = run_search(
        _supernet_option(args.supernet, args.seed, args.task),
        validation,
        output_dir=args.output_dir,
        population_size=args.population_size,
        generations=args.generations,
        max_bitops=args.max_bitops,
        max_eval_batches=args.max_eval_batches,
        seed=args.seed,
        latency_model=_load_latency_model(args.latency_model),
        max_latency_ms=args.max_latency_ms,
        max_weight_bytes=args.max_weight_bytes,
    )
    for row in front.to_table():
        print(row)


def cmd_extract(args) -> None:
    from .checkpoints import state_dict_sha256
    from .hub import save_subnet_with_card
    from .search.front import ParetoFront

    supernet = _supernet_option(args.supernet, task=args.task)
    front = None
    if args.pareto_front:
        with loading("--pareto-front", args.pareto_front, hub=False):
            front = ParetoFront.load(args.pareto_front)
    subnet = supernet.extract_subnet(
        args.budget, pareto_front=front, max_latency_ms=args.max_latency_ms,
        latency_model=_load_latency_model(args.latency_model),
    )
    # The front's entry of the extracted architecture (chosen under BitOPs or latency), for its mean IoU.
    # Compared as dicts: a saved subnet lists its layers in another order than the search space.
    chosen = subnet.architecture.to_dict()
    entry = next((e for e in front.entries if e.to_architecture().to_dict() == chosen), None) if front else None
    searched_weights = front.metadata.get("supernet_weights_sha256") if front else None
    if entry is not None and searched_weights not in (None, state_dict_sha256(supernet)):
        # The front's mean IoUs belong to the weights it was searched with (e.g. before more training): the card
        # must not claim them for these.
        print(
            f"mpsupernet extract: warning: --pareto-front was searched on other weights than {args.supernet}'s; its "
            "architecture is used, its mean IoU is not written into the card (search this supernet to measure it).",
            file=sys.stderr,
        )
        entry = None
    # The mean IoU comes from the front: the card names the data the search measured it on.
    measured_on = (front.metadata.get("dataset") or {}).get("name") if entry else None
    save_subnet_with_card(
        subnet,
        args.output_dir,
        base_model=args.base_model,
        dataset_name=args.dataset_name or measured_on,
        mean_iou=entry.mean_iou if entry else None,
    )
    print(json.dumps(subnet.bitops_report().summary(), indent=2))


def _load_subnet_folder(option: str, folder: str):
    """A saved subnet, promptable or semantic (its config says which)."""
    from transformers import PretrainedConfig

    from .tasks import subnet_class

    with loading(option, folder):
        return subnet_class(PretrainedConfig.get_config_dict(folder)[0]).from_pretrained(folder)


def cmd_export(args) -> None:
    subnet = _load_subnet_folder("--subnet", args.subnet)
    print(subnet.export_onnx(args.output_dir, target=args.target, weight_container=args.weight_container))


def cmd_push(args) -> None:
    from .hub import push_tiers

    tiers = {name: _load_subnet_folder("--tier", folder) for name, folder in _unique_names("--tier", args.tier).items()}
    mean_ious = _unique_names("--mean-iou", args.mean_iou)
    with talking_to_the_hub(args.repo_id):
        url = push_tiers(
            tiers, args.repo_id, base_model=args.base_model, dataset_name=args.dataset_name, mean_ious=mean_ious,
            private=args.private, export_onnx=not args.no_onnx, onnx_target=args.target,
            onnx_weight_container=args.weight_container,
        )
    print(url)


def _name_and_value(kind: str, convert=str):
    """An argparse `type` that reads `NAME=VALUE` into `(name, convert(value))`; `kind` names the value in errors."""

    def parse(text: str) -> tuple[str, object]:
        name, separator, value = text.partition("=")
        if not (name and separator and value):
            raise argparse.ArgumentTypeError(f"{text!r} is not NAME={kind}")
        try:
            return name, convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a {kind.lower()}") from None

    return parse


def _unique_names(option: str, pairs: list[tuple[str, object]]) -> dict:
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{option} names {repeated} more than once; give each name once.")
    return dict(pairs)


def cmd_demo(args) -> None:
    if args.task == "semantic":
        from .demo_semantic import run_semantic_demo as run
    else:
        from .demo import run_demo as run

    # Only the options given: the others keep the demo's defaults (importing them here would import torch).
    options = ("output_dir", "train_steps", "population_size", "generations", "seed")
    run(**{name: getattr(args, name) for name in options if getattr(args, name) is not None})


def _add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latency-model", default=None, help="a folder or file of `mpsupernet latency-model`")
    parser.add_argument(
        "--max-latency-ms", type=float, default=None, help="a latency budget in predicted ms (needs --latency-model)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpsupernet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="turn a SAM checkpoint into a supernet")
    convert.add_argument(
        "--sam",
        default="embedded-sam",
        help="'embedded-sam' (the package's default SAM), 'shapes-sam' (its tiny one), a folder (one here named like a "
        "shipped SAM is read as the folder), or a Hub id like facebook/sam-vit-base",
    )
    convert.add_argument("--output-dir", required=True)
    convert.add_argument("--lora-mode", default="multiplex", choices=("shared", "multiplex", "multipath"))
    convert.add_argument("--lora-rank", type=int, default=8)
    convert.set_defaults(func=cmd_convert)

    train = commands.add_parser("train", help="train a supernet (use `accelerate launch -m mpsupernet.cli train` to scale)")
    train.add_argument(
        "--supernet",
        default="embedded-sam",
        help="'embedded-sam' or 'shapes-sam' (a new supernet of a SAM shipped in the package) or a saved supernet folder "
        "(one here named like a shipped SAM is read as the folder)",
    )
    _add_dataset_arguments(train)
    train.add_argument("--output-dir", required=True)
    train.add_argument("--max-steps", type=int, default=200)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--warmup-ratio", type=float, default=0.05, help="share of the steps spent warming up")
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--num-random-subnets", type=int, default=2)
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--save-steps", type=int, default=None)
    train.add_argument("--resume-from-checkpoint", default=None)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train)

    search = commands.add_parser("search", help="evolutionary search of the Pareto front (BitOPs vs mIoU)")
    search.add_argument("--supernet", required=True)
    _add_dataset_arguments(search)
    search.add_argument("--output-dir", required=True)
    search.add_argument("--population-size", type=int, default=16)
    search.add_argument("--generations", type=int, default=5)
    search.add_argument("--max-bitops", default=None, help='a budget: "120G", "1.5T", "5%%" or a number')
    search.add_argument("--max-eval-batches", type=int, default=None)
    _add_latency_arguments(search)
    search.add_argument(
        "--max-weight-bytes", type=int, default=None, help="a budget in bytes of the exported encoder's weights"
    )
    search.add_argument("--seed", type=int, default=0)
    search.set_defaults(func=cmd_search)

    extract = commands.add_parser("extract", help="extract the best subnet under a BitOPs or latency budget")
    extract.add_argument("--supernet", required=True)
    extract.add_argument("--budget", default=None, help='"120G", "1.5T", "5%%" or a number of BitOPs')
    _add_latency_arguments(extract)
    extract.add_argument("--pareto-front", default=None, help="pareto_front.json written by `mpsupernet search`")
    _add_task_argument(extract)
    extract.add_argument("--output-dir", required=True)
    extract.add_argument("--base-model", default=None, help="for the card; default: the supernet's recorded base model")
    extract.add_argument(
        "--dataset-name", default=None, help="for the card; default: the front's dataset, else the training data"
    )
    extract.set_defaults(func=cmd_extract)

    latency = commands.add_parser(
        "latency-model", help="fit a latency model of a supernet's subnets on this machine (exported, timed)"
    )
    latency.add_argument("--supernet", default="embedded", help="as for `train`")
    latency.add_argument("--output-dir", required=True, help="where latency_model.json goes")
    latency.add_argument("--runtime", default="onnxruntime", choices=EXPORT_TARGETS)
    latency.add_argument("--num-threads", type=int, default=1, help="the runtime's intra-op threads")
    latency.add_argument("--num-subnets", type=int, default=12, help="subnets exported and timed for the fit")
    latency.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    latency.add_argument(
        "--max-spread", default="0.25", help="refuse runs spread more than this (IQR/median); 'none' accepts and flags"
    )
    latency.add_argument("--seed", type=int, default=0)
    latency.set_defaults(func=cmd_latency_model)

    export = commands.add_parser("export", help="export an extracted subnet to ONNX (integer kernels, no PyTorch)")
    export.add_argument("--subnet", required=True, help="folder or Hub id of an extracted subnet")
    export.add_argument("--output-dir", required=True)
    export.add_argument("--target", default="onnxruntime", choices=EXPORT_TARGETS, help="the runtime to export for")
    export.add_argument(
        "--weight-container", default="int8", choices=WEIGHT_CONTAINERS, help="int4 stores codes of at most 4 bits"
    )
    export.set_defaults(func=cmd_export)

    push = commands.add_parser("push", help="publish extracted subnets as tiers of one Hub repository")
    push.add_argument("--repo-id", required=True)
    push.add_argument(
        "--tier", action="append", required=True, type=_name_and_value("FOLDER"),
        help="NAME=FOLDER of an extracted subnet (repeat)",
    )
    push.add_argument(
        "--mean-iou", action="append", default=[], type=_name_and_value("NUMBER", float),
        help="NAME=NUMBER: a tier's measured mean IoU, in [0, 1] (repeat)",
    )
    push.add_argument("--base-model", default=None, help="for the cards; default: the tiers' recorded base model")
    push.add_argument("--dataset-name", default=None, help="for the cards; default: the tiers' training data")
    push.add_argument("--private", action="store_true")
    push.add_argument("--no-onnx", action="store_true", help="publish the PyTorch subnets without ONNX exports")
    push.add_argument("--target", default="onnxruntime", choices=EXPORT_TARGETS, help="ONNX export target")
    push.add_argument("--weight-container", default="int8", choices=WEIGHT_CONTAINERS, help="ONNX weight storage")
    push.set_defaults(func=cmd_push)

    demo = commands.add_parser("demo", help="the whole method end to end on the embedded default, offline")
    demo.add_argument("--output-dir", help="where everything goes (default: outputs/demo) (semantic: outputs/demo-semantic)")
    demo.add_argument("--train-steps", type=int, help="sandwich steps of supernet training (default: 400) (semantic: 200)")
    demo.add_argument("--population-size", type=int, help="the search's population (default: 16) (semantic: 12)")
    demo.add_argument("--generations", type=int, help="the search's generations (default: 6) (semantic: 4)")
    demo.add_argument("--seed", type=int, help="seeds data, prompts, sampling and search (default: 0)")
    _add_task_argument(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (SourceError, ValueError) as error:
        print(f"mpsupernet {args.command}: error: {error}", file=sys.stderr)
        return 2
    except HubError as error:
        print(f"mpsupernet {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
