"""Command-line interface: parses arguments and delegates to the Python API.

Exit codes: 0 success, 1 usage or fatal error, 2 some inputs failed (the rest were processed).
"""

from __future__ import annotations

import functools
import inspect as pyinspect
import logging
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from cxr_pneumonia import __version__

# Commands whose options come from config models, built when first used: the models' modules
# import Keras, which `preprocess`, `inspect` or `--version` should not pay for.
_DEFERRED: dict[str, Callable[[], Any]] = {}
_DEFERRED_HELP: dict[str, str] = {}  # each deferred command's docstring, for the command list
_ORDER = (
    "preprocess", "inspect", "train", "gate", "export", "evaluate", "robustness", "predict", "explain",
    "serve",
)  # fmt: skip


class _Commands(TyperGroup):
    """The command group, building deferred commands on first use."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        names = {*super().list_commands(ctx), *_DEFERRED}
        return sorted(names, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in _DEFERRED and cmd_name not in self.commands:
            if self._listing:
                # The command list shows one line per command: its docstring is enough, and
                # building the command would import Keras (seconds, and TensorFlow's log lines).
                return TyperCommand(name=cmd_name, help=_DEFERRED_HELP[cmd_name])
            self.add_command(_DEFERRED[cmd_name](), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="cxr-pneumonia",
    help="Chest X-ray pneumonia classifier: preprocess, inspect, train, gate, evaluate, robustness, "
    "calibrate, export, predict, explain, serve. Research use only, not a medical device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Commands,
)

EXIT_OK, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2

log = logging.getLogger("cxr_pneumonia")


class CommandError(Exception):
    """A fatal error shown as one line, exit code 1."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # pydicom logs a traceback at ERROR for every decoder plugin that fails on a file; the
        # file's one-line error already quotes each plugin's reason. A filter on our handlers,
        # since importing pydicom resets its logger's level.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_not_pydicom)


def _not_pydicom(record: logging.LogRecord) -> bool:
    return not (record.name == "pydicom" or record.name.startswith("pydicom."))


def _echo_err(message: str) -> None:
    typer.echo(message, err=True)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit(EXIT_OK)
    _setup_logging(verbose)


# --------------------------------------------------------------------------------------------
# Options generated from the config models
# --------------------------------------------------------------------------------------------


def _cli_type(annotation: Any) -> tuple[type, tuple[str, ...]]:
    """(option type, choices) of a config field's annotation; a choice is given as a string."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, tuple(map(str, typing.get_args(annotation)))
    if args and type(None) in typing.get_args(annotation):  # X | None
        return _cli_type(args[0])
    if annotation in (int, float, str, bool):
        return annotation, ()
    raise TypeError(f"no command-line type for {annotation!r}")


def _config_option(cls: Any, name: str) -> pyinspect.Parameter:
    """``--name`` for one config field: its type, its description (and choices) as help; default
    None, meaning "keep the config's value"."""
    field = cls.model_fields[name]
    kind, choices = _cli_type(field.annotation)
    text = field.description or ""
    if choices:
        text += f" One of: {', '.join(choices)}."
    if field.default is not None and not field.is_required():
        default = f"{field.default:g}" if isinstance(field.default, float) else field.default
        text += f" (default: {default})"
    option = typer.Option(help=text)
    return pyinspect.Parameter(
        name, pyinspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
    )


def _deferred_command(name: str, configs: Callable[[], tuple[Any, ...]], skip: tuple[str, ...] = ()):
    """Register ``command`` as ``name``, built on first use with one option per ``cli_fields`` entry
    of each config model ``configs()`` returns (less ``skip``); the command receives their values
    as ``overrides`` (None: not given)."""

    def register(command: Callable[..., None]) -> Callable[..., None]:
        def build() -> Any:
            options = [_config_option(c, f) for c in configs() for f in c.cli_fields if f not in skip]
            own = pyinspect.signature(command, eval_str=True).parameters.values()

            @functools.wraps(command)
            def run(**values: Any) -> None:
                overrides = {p.name: values.pop(p.name) for p in options}
                command(**values, overrides=overrides)

            run.__signature__ = pyinspect.Signature(  # type: ignore[attr-defined]
                [*(p for p in own if p.name != "overrides"), *options]
            )
            single = typer.Typer(add_completion=False)
            single.command(name)(run)
            return typer.main.get_command(single)

        _DEFERRED[name] = build
        _DEFERRED_HELP[name] = pyinspect.getdoc(command) or ""
        return command

    return register


# --------------------------------------------------------------------------------------------
# preprocess
# --------------------------------------------------------------------------------------------

StepsOff = Annotated[
    list[str] | None,
    typer.Option(
        "--no-step",
        help="Switch a preprocessing step off (repeatable): downscale, denoise, clahe, crop, mask, morph, "
        "apply_mask, resize.",
    ),
]


def _preprocess_config(config_file: Path | None, overrides: dict[str, Any], steps_off: list[str] | None):
    from cxr_pneumonia.config import from_dict, override, read_json
    from cxr_pneumonia.preprocess import PreprocessConfig, disable_steps

    try:
        cfg = PreprocessConfig()
        if config_file is not None:
            values = read_json(config_file)
            # A run's config.json holds every stage; its "preprocess" section is the one meant.
            if isinstance(values, dict) and isinstance(values.get("preprocess"), dict):
                values = values["preprocess"]
            cfg = from_dict(PreprocessConfig, values)
        cfg = override(cfg, **overrides)
        return disable_steps(cfg, *(steps_off or []))
    except (OSError, ValueError, TypeError) as e:
        where = f"{config_file}: " if config_file is not None else ""
        raise CommandError(f"{where}preprocessing config: {e}") from e


def _preprocess_configs() -> tuple[Any, ...]:
    from cxr_pneumonia.preprocess import PreprocessConfig

    return (PreprocessConfig,)


@_deferred_command("preprocess", _preprocess_configs)
def preprocess(
    src: Annotated[
        Path,
        typer.Argument(metavar="SRC", help="Folder of images (any depth).", exists=True, file_okay=False),
    ],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="Output folder; mirrors SRC's tree as PNG.")],
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: CPU cores).", min=1)] = None,
    no_step: StepsOff = None,
    config: Annotated[Path | None, typer.Option(help="PreprocessConfig JSON (e.g. a run's).")] = None,
    preview: Annotated[Path | None, typer.Option(help="Write a before/after panel PNG here.")] = None,
    *,
    overrides: dict[str, Any],
) -> None:
    """Preprocess every image under SRC into DST (skips files already done with the same config)."""
    from cxr_pneumonia.batch import preprocess_tree
    from cxr_pneumonia.io import list_image_files
    from cxr_pneumonia.preview import write_preview

    cfg = _preprocess_config(config, overrides, no_step)
    try:
        # A fresh CLI process has no running thread pools, so forking workers is safe and fast.
        report = preprocess_tree(src, dst, cfg, workers=workers, start_method="fork")
    except (OSError, ValueError) as e:
        raise CommandError(str(e)) from e
    for source, reason in report.failures:
        _echo_err(f"error: {source}: {reason}")
    # An up-to-date preview is kept: a rerun with nothing to do stays a no-op.
    if preview is not None and (report.processed or not preview.exists()):
        readable = [p for p in list_image_files(src) if str(p) not in dict(report.failures)]
        try:
            write_preview(_spread(readable, 4), cfg, preview)
            typer.echo(f"preview: {preview}")
        except ValueError as e:
            _echo_err(f"error: preview: {e}")
    typer.echo(f"{dst}: {report.summary()}")
    if report.failures:
        typer.echo(f"{len(report.failures)} of {report.n_total} files failed; see {dst / 'failures.csv'}")
        raise typer.Exit(EXIT_PARTIAL)


def _spread(items: list, n: int) -> list:
    """n items spread evenly over the list (so a preview shows both classes)."""
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


@app.command()
def inspect(
    root: Annotated[
        Path,
        typer.Argument(
            metavar="ROOT", help="Dataset root (Kaggle layout, class folders) or CSV.", exists=True
        ),
    ],
    workers: Annotated[int | None, typer.Option(help="Worker processes for decoding.", min=1)] = None,
) -> None:
    """A dataset's health: counts, duplicates, unreadable files, patient leaks, declared non-frontals.

    Class counts per split, duplicates, unreadable files, image sizes, patients in several splits,
    DICOM files whose header says they are not frontal chest X-rays."""
    from cxr_pneumonia.data import DatasetError, format_report, inspect_dataset

    try:
        report = inspect_dataset(root, workers=workers)
    except (DatasetError, OSError) as e:
        raise CommandError(str(e)) from e
    typer.echo(format_report(report))
    if report.unreadable:
        raise typer.Exit(EXIT_PARTIAL)


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


def _train_configs() -> tuple[Any, ...]:
    from cxr_pneumonia.model import ModelConfig
    from cxr_pneumonia.preprocess import PreprocessConfig
    from cxr_pneumonia.train import TrainConfig

    return PreprocessConfig, ModelConfig, TrainConfig


# The preprocessing size follows --image-size.
@_deferred_command("train", _train_configs, skip=("size",))
def train(
    data: Annotated[
        Path | None,
        typer.Argument(metavar="DATA", help="Training data: Kaggle layout, class folders or CSV."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory to create.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run directory.")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON with preprocess/model/train sections.")] = None,
    *,
    overrides: dict[str, Any],
) -> None:
    """Train a classifier: patient-grouped validation split, cached features, recall-first threshold."""
    from cxr_pneumonia.api import train as api_train
    from cxr_pneumonia.model import WeightsUnavailableError
    from cxr_pneumonia.train import TrainingError

    given = sorted(f"--{name.replace('_', '-')}" for name, value in overrides.items() if value is not None)
    if resume is not None:
        if data is not None or out is not None or config is not None or given:
            extra = ", ".join(given) or "DATA, --out or --config"
            raise CommandError(f"--resume RUN takes no {extra}: the run directory holds the settings")
        target, kwargs = resume, {"resume": True}
    else:
        if data is None or out is None:
            raise CommandError("give DATA and --out RUN (or --resume RUN)")
        target, kwargs = out, _train_settings(config, overrides)
    try:
        run = api_train(data, target, **kwargs)
    except (TrainingError, WeightsUnavailableError, ValueError, OSError) as e:
        raise CommandError(str(e)) from e
    info, metrics = run.threshold_info, run.metrics_val or {}
    typer.echo(f"run: {run.path}")
    rule, target, spread = info.get("rule"), info.get("target_recall"), info.get("spread") or {}
    how = "fixed" if rule == "fixed" else f"{rule}, validation target recall {target}"
    typer.echo(f"threshold {run.threshold:.4f} ({how})")
    if spread.get("threshold"):
        low, high = spread["threshold"]
        typer.echo(
            f"target-recall thresholds of {spread['n_groups_used']} acquisition groups: {low:.3f}-{high:.3f}"
        )
    typer.echo(
        "validation: "
        + ", ".join(f"{k} {_fmt(metrics.get(k))}" for k in ("recall", "specificity", "roc_auc"))
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _train_settings(path: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The three configs: the file's sections (or the defaults), then the options given, validated
    here so that a wrong value fails before any image is read."""
    from cxr_pneumonia.config import ConfigError, override

    configs = dict(zip(("preprocess_cfg", "model_cfg", "train_cfg"), _train_configs(), strict=True))
    from_file = dict(zip(configs, _configs_from_file(path), strict=True))
    if overrides.get("preset") is not None:  # the preset is the base; options given still win
        from cxr_pneumonia.train import preset_configs

        if path is not None:
            raise CommandError("give --preset or --config, not both")
        try:
            from_file = dict(zip(configs, preset_configs(overrides["preset"]), strict=True))
        except ConfigError as e:
            raise CommandError(str(e)) from e
    settings = {}
    try:
        for key, cls in configs.items():
            mine = {k: v for k, v in overrides.items() if k in cls.model_fields}
            settings[key] = override(from_file[key] or cls(), **mine)
    except ConfigError as e:
        raise CommandError(str(e)) from e
    return settings


def _configs_from_file(path: Path | None):
    """(PreprocessConfig, ModelConfig, TrainConfig) from a JSON file such as a run's config.json."""
    if path is None:
        return None, None, None
    from cxr_pneumonia.config import from_dict, read_json

    try:
        values = read_json(path)
        return tuple(
            from_dict(cls, values[key]) if values.get(key) else None
            for key, cls in zip(("preprocess", "model", "train"), _train_configs(), strict=True)
        )
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CommandError(f"{path}: {e}") from e


# --------------------------------------------------------------------------------------------
# gate
# --------------------------------------------------------------------------------------------


def _gate_configs() -> tuple[Any, ...]:
    from cxr_pneumonia.gate import GateConfig

    class GateOptions(GateConfig):
        cli_fields: typing.ClassVar[tuple[str, ...]] = (
            "accept_quantile", "max_fit_images", "fit_augmented_views", "pca_components", "orientation_check",
            "polarity_check", "symmetry_check", "seed",
        )  # fmt: skip

    return (GateOptions,)


@_deferred_command("gate", _gate_configs)
def gate(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A complete run directory.")],
    data: Annotated[
        Path | None,
        typer.Argument(metavar="[DATA]", help="The training data (default: what the run was trained on)."),
    ] = None,
    *,
    overrides: dict[str, Any],
) -> None:
    """Fit (or refit) the run's input gate on its own training images; the limit on its validation images."""
    from cxr_pneumonia.api import fit_gate
    from cxr_pneumonia.config import ConfigError
    from cxr_pneumonia.data import DatasetError
    from cxr_pneumonia.gate import GateError
    from cxr_pneumonia.rundir import RunError
    from cxr_pneumonia.train import TrainingError

    try:
        info = fit_gate(run, data, **{k: v for k, v in overrides.items() if v is not None})
    except (TrainingError, GateError, DatasetError, ConfigError, RunError, ValueError, OSError) as e:
        raise CommandError(str(e)) from e
    typer.echo(
        f"gate: {run / 'gate'} ({info['n_fit']} training images, layers {', '.join(info['layers'])})\n"
        f"limit {info['limit']:.2f} (accepts {info['config']['accept_quantile']:.0%} of "
        f"{info['n_val']} validation images and {info['n_perturbed']} perturbed views)"
    )


# --------------------------------------------------------------------------------------------
# export, and the runtime option of the commands that apply a run
# --------------------------------------------------------------------------------------------

RuntimeOpt = Annotated[
    str,
    typer.Option(
        "--runtime",
        help="auto (the run's export when present, else Keras), keras (float32) or openvino (the export).",
    ),
]


GateOpt = Annotated[
    bool,
    typer.Option(
        "--gate/--no-gate",
        help="The input check: images unlike the frontal chest X-rays the run was trained on are "
        "rejected (no probability, no label). --no-gate classifies them anyway and marks them.",
    ),
]
OperatingPointOpt = Annotated[
    str | None,
    typer.Option(
        "--operating-point",
        metavar="NAME",
        help="Apply this operating point's threshold (saved by `calibrate`; default: the validation one).",
    ),
]
PREDICT_COLUMNS = [
    "path", "status", "probability", "label", "threshold", "operating_point", "domain_score", "domain_limit",
    "reason", "error",
]  # fmt: skip


def _check_writable(out: Path | None, *, folder: bool) -> None:
    """Refuse an output path that cannot be written, before any image is scored (the write comes
    last, and failing there would lose every result)."""
    if out is None:
        return
    if folder and out.exists() and not out.is_dir():
        raise CommandError(f"{out}: exists and is not a folder")
    if not folder and out.is_dir():
        raise CommandError(f"{out}: is a folder; give a file name")
    # The folder that would receive it: the folder itself, a file's folder, or their nearest
    # existing parent (missing folders are created).
    existing = next(p for p in ((out,) if folder else ()) + tuple(out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"{out}: cannot be written ({existing} is not a writable folder)")


def _load_run(run: Path, runtime: str, operating_point: str | None = None):
    from cxr_pneumonia.predict import Run
    from cxr_pneumonia.rundir import RunError

    try:
        loaded = Run.load(run, runtime=runtime, operating_point=operating_point)
    except RunError as e:
        raise CommandError(str(e)) from e
    info = loaded.runtime
    log.info(
        "runtime: %s, %s%s",
        info["backend"],
        info["precision"],
        f" ({info['reason']})" if info.get("reason") else "",
    )
    return loaded


@app.command("export")
def export_command(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory.")],
    export_format: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
    precision: Annotated[
        str, typer.Option(help="auto (bf16 where the check allows), fp32, or bf16 (everything).")
    ] = "auto",
    tolerance: Annotated[float, typer.Option(help="Largest |Δp| against float32 allowed.")] = 0.01,
    calibration: Annotated[
        Path | None,
        typer.Option(help="Labelled validation images (class folders); default: the run's validation split."),
    ] = None,
    calibration_images: Annotated[int, typer.Option(help="Images to check on (0: all).", min=0)] = 512,
    segments: Annotated[int, typer.Option(help="Backbone parts that may each run in bf16.", min=1)] = 6,
) -> None:
    """Export to ONNX, with the fastest OpenVINO precision plan that stays within --tolerance.

    The ONNX model is float32 (any runtime); the plan keeps probabilities within --tolerance of
    float32 on validation images. Never pass test images."""
    from cxr_pneumonia.export import ExportConfig, ExportError, export_run
    from cxr_pneumonia.rundir import RunError, export_dir

    try:
        cfg = ExportConfig(
            format=export_format,
            precision=precision,
            tolerance=tolerance,
            calibration_images=calibration_images,
            segments=segments,
        )
        info = export_run(run, cfg, calibration=calibration)
    except (ExportError, RunError, ValueError, OSError) as e:
        raise CommandError(str(e)) from e
    checks = info["checks"]
    plan = " ".join(s["precision"] for s in info["segments"])
    typer.echo(f"{export_dir(run) / info['file']}: segments {plan}")
    if checks:
        typer.echo(
            f"on {info['calibration']['n_images']} images ({info['calibration']['source']}): "
            f"max |Δp| {checks['max_abs_diff']:.4f}, ROC-AUC {_fmt(checks['roc_auc'])} "
            f"(float32 {_fmt(checks['roc_auc_fp32'])}), {checks['images_per_s']} images/s, "
            f"{checks['speedup_vs_fp32']}× float32"
        )


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory.")],
    data: Annotated[
        Path, typer.Argument(metavar="DATA", help="Labelled data: class folders, Kaggle layout or CSV.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    split: Annotated[str | None, typer.Option(help="Only this split of a Kaggle layout (e.g. test).")] = None,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples for the 95 % intervals (0: none).", min=0)
    ] = 1000,
    heatmaps: Annotated[bool, typer.Option(help="Grad-CAM for misclassified images in the report.")] = True,
    runtime: RuntimeOpt = "auto",
    gate: GateOpt = True,
    operating_point: OperatingPointOpt = None,
) -> None:
    """Metrics with 95 % intervals (patient-level bootstrap) and an HTML report.

    At the run's saved threshold (or --operating-point), on the images the input check accepts
    and on all images."""
    from cxr_pneumonia.api import evaluate as api_evaluate
    from cxr_pneumonia.data import DatasetError
    from cxr_pneumonia.rundir import RunError

    _check_writable(out, folder=True)
    loaded = _load_run(run, runtime, operating_point)
    try:
        metrics = api_evaluate(
            loaded, data, out, split=split, n_bootstrap=bootstrap, heatmaps=heatmaps, gate=gate
        )
    except (RunError, DatasetError, ValueError, OSError) as e:
        raise CommandError(str(e)) from e
    ci = metrics["ci95"]
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"):
        value, interval = metrics.get(key), ci.get(key)
        shown = "n/a" if value is None else f"{value:.3f}"
        if interval and interval[0] is not None:
            shown += f"  (95 % CI {interval[0]:.3f}-{interval[1]:.3f})"
        typer.echo(f"{key:12s} {shown}")
    typer.echo(f"confusion matrix [[tn, fp], [fn, tp]]: {metrics['confusion_matrix']}")
    typer.echo(
        f"operating point {metrics['operating_point']} (threshold {metrics['threshold']:.4g}); intervals: "
        f"{metrics['ci_unit']}-level bootstrap over {metrics['n_ci_units']} {metrics['ci_unit']}s"
    )
    _echo_domain(metrics)
    typer.echo(f"report: {out / 'report.html'}\nmetrics: {out / 'metrics.json'}")
    if metrics["n_failed"]:
        typer.echo(f"{metrics['n_failed']} files could not be read; see {out / 'failures.csv'}")
        raise typer.Exit(EXIT_PARTIAL)


def _echo_domain(metrics: dict[str, Any]) -> None:
    """What the input check did to an evaluation: which images the metrics are on, and the
    all-images metrics beside them (the batch-shift line is logged by the evaluation itself)."""
    domain = metrics.get("domain") or {}
    if metrics.get("n_age_outside"):
        typer.echo(
            f"{metrics['n_age_outside']} images whose DICOM header declares an age outside the training "
            "patients' (marked unusual in predictions.csv)"
        )
    if not domain.get("checked"):
        typer.echo(f"input check: none ({domain.get('message', 'not recorded')})")
        return
    n, rejected = domain["n_images"], domain["n_rejected"]
    every = metrics.get("all_images") or {}
    typer.echo(
        f"input check: {rejected} of {n} images rejected, {domain['n_unusual']} unusual; "
        f"metrics above on {metrics['evaluated_on']} ({metrics['n']})"
    )
    typer.echo(
        f"all {every.get('n', n)} images: "
        + ", ".join(f"{k} {_fmt(every.get(k))}" for k in ("recall", "specificity", "roc_auc"))
    )


@app.command()
def calibrate(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory.")],
    data: Annotated[
        Path | None,
        typer.Argument(
            metavar="[DATA]", help="The site's labelled sample: class folders, Kaggle layout or CSV."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of the operating point to save.")] = None,
    target_recall: Annotated[
        float | None, typer.Option(help="Recall to reach on the sample (default: the run's).", min=0, max=1)
    ] = None,
    rule: Annotated[
        str | None,
        typer.Option(
            help="max_specificity (the highest specificity at the target recall) or midpoint (halfway "
            "down to the next score); default: the run's own when it is one of them, else max_specificity."
        ),
    ] = None,
    width: Annotated[
        float, typer.Option(help="Interval width (upper - lower) to say how many more images would reach.")
    ] = 0.05,
    replace: Annotated[bool, typer.Option("--replace", help="Replace a point of that name.")] = False,
    list_points: Annotated[bool, typer.Option("--list", help="List the run's operating points.")] = False,
    split: Annotated[str | None, typer.Option(help="Only this split of a Kaggle layout.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples (of patients).", min=1)] = 1000,
    runtime: RuntimeOpt = "auto",
    gate: GateOpt = True,
) -> None:
    """Choose a site's operating point on its labelled sample and keep it in the run under --name.

    The threshold for the target recall, with patient-level 95 % intervals; apply it with
    --operating-point."""
    from cxr_pneumonia.calibration import more_images_line, operating_points, preflight
    from cxr_pneumonia.data import DatasetError
    from cxr_pneumonia.rundir import RunError

    if (data is None or name is None) and not list_points:
        raise CommandError("give DATA and --name NAME (or --list)")
    try:
        if list_points:
            return _echo_points(operating_points(run))
        preflight(run, data, name=name, replace=replace, split=split, rule=rule)  # before the model is loaded
    except (RunError, DatasetError, ValueError, OSError) as e:
        raise CommandError(str(e)) from e
    from cxr_pneumonia.api import calibrate as api_calibrate  # the model's modules: only now

    loaded = _load_run(run, runtime)
    try:
        point = api_calibrate(
            loaded, data, name=name, target_recall=target_recall, rule=rule, width=width,
            n_bootstrap=bootstrap, replace=replace, split=split, gate=gate,
        )  # fmt: skip
    except (RunError, DatasetError, ValueError, OSError) as e:
        raise CommandError(str(e)) from e
    ci = point["ci95"]
    typer.echo(f"operating point {name!r} saved in {run / 'operating_points.json'}")
    typer.echo(
        f"threshold {point['threshold']:.4f} (95 % CI {_interval(ci['threshold'], 4)}) for target recall "
        f"{point['target_recall']:g} ({point['rule']}), on {point['n']} images ({point['n_pos']} PNEUMONIA, "
        f"{point['n_neg']} NORMAL) of {point['n_patients']} patients; {point['n_rejected']} rejected by "
        "the input check"
    )
    typer.echo(
        f"at it: recall {point['recall']:.3f} ({_interval(ci['recall'])}), specificity "
        f"{point['specificity']:.3f} ({_interval(ci['specificity'])}); 95 % CIs, patient-level bootstrap"
    )
    typer.echo(more_images_line(point))
    typer.echo(f"apply it: --operating-point {name}")
    if point["n_failed"]:
        typer.echo(f"{point['n_failed']} files could not be read and were left out")
        raise typer.Exit(EXIT_PARTIAL)


def _interval(ci: list[float] | None, digits: int = 3) -> str:
    return "n/a" if not ci else f"{ci[0]:.{digits}f}-{ci[1]:.{digits}f}"


def _echo_points(points: dict[str, dict[str, Any]]) -> None:
    """One line per operating point: name, threshold, target recall, rule, recall and specificity
    where it was chosen, where and when."""
    width = max([16, *map(len, points)])
    typer.echo(
        f"{'name':{width}s} {'threshold':>9s} {'target':>6s} {'rule':16s} {'recall':>6s} {'spec.':>6s}"
        "  chosen on"
    )
    for name, point in points.items():
        when = f", {point['created_at']}" if point.get("created_at") else ""
        typer.echo(
            f"{name:{width}s} {point['threshold']:9.4f} {_fmt(point.get('target_recall')):>6s} "
            f"{point.get('rule', 'n/a'):16s} {_fmt(point.get('recall')):>6s} "
            f"{_fmt(point.get('specificity')):>6s}  {point.get('chosen_on', 'n/a')}{when}"
        )


@app.command()
def robustness(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory.")],
    data: Annotated[
        Path | None,
        typer.Argument(metavar="[DATA]", help="Labelled data (default: the run's validation images)."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write robustness.json here.")] = None,
    split: Annotated[str | None, typer.Option(help="Only this split of a Kaggle layout.")] = None,
    runtime: RuntimeOpt = "auto",
) -> None:
    """ROC-AUC, recall and specificity under contrast, gamma, blur, JPEG, crop, zoom and rotation."""
    from cxr_pneumonia.api import robustness as api_robustness
    from cxr_pneumonia.data import DatasetError
    from cxr_pneumonia.rundir import RunError

    _check_writable(out, folder=True)
    loaded = _load_run(run, runtime)
    try:
        results = api_robustness(loaded, data, out, split=split)
    except (RunError, DatasetError, ValueError, OSError) as e:
        raise CommandError(str(e)) from e
    typer.echo(
        f"{'perturbation':16s} {'n':>5s} {'failed':>6s} {'roc_auc':>8s} {'recall':>7s} {'specificity':>11s}"
    )
    for name, row in results.items():
        typer.echo(
            f"{name:16s} {row['n']:5d} {row['n_failed']:6d} {_fmt(row['roc_auc']):>8s} "
            f"{_fmt(row['recall']):>7s} {_fmt(row['specificity']):>11s}"
        )
    failed, scored = results["clean"]["n_failed"], results["clean"]["n"]
    if failed:
        typer.echo(
            f"{failed} of {failed + scored} images could not be read or preprocessed and were left out"
        )
        raise typer.Exit(EXIT_PARTIAL)


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory.")],
    inputs: Annotated[list[Path], typer.Argument(help="Image files (JPEG/PNG/DICOM) and folders.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here (.csv or .json); default: CSV on stdout.")
    ] = None,
    output_format: Annotated[
        str | None, typer.Option("--format", help="csv or json (default: from --out's suffix, else csv).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", min=1)] = 32,
    heatmaps: Annotated[Path | None, typer.Option(help="Write Grad-CAM overlays into this folder.")] = None,
    runtime: RuntimeOpt = "auto",
    gate: GateOpt = True,
    operating_point: OperatingPointOpt = None,
    engine: Annotated[
        str,
        typer.Option(
            help="local, or ray: a Ray Data job writing Parquet into the folder --out, resumable "
            "(README: Ray scoring)."
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="--engine ray: the Ray cluster (ray://HOST:10001, auto); default a local Ray."),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="--engine ray: model actors.", min=1)] = None,
) -> None:
    """Probability and label for every image, after the input check. Research use only.

    The input check's verdict, then probability and label at the run's threshold for every image
    (none for a rejected one unless --no-gate)."""
    if engine != "local":
        return _predict_ray(run, inputs, out, engine=engine, address=address, workers=workers,
                            batch_size=batch_size, runtime=runtime, gate=gate, heatmaps=heatmaps,
                            operating_point=operating_point)  # fmt: skip
    import pandas as pd
    from tqdm.auto import tqdm

    from cxr_pneumonia.config import atomic_write_text
    from cxr_pneumonia.predict import expand_inputs
    from cxr_pneumonia.rundir import DISCLAIMER

    _check_writable(out, folder=False)
    _check_writable(heatmaps, folder=True)
    fmt = (output_format or (out.suffix.lstrip(".") if out is not None else "csv")).lower()
    if fmt not in ("csv", "json"):
        raise CommandError(f"--format must be csv or json, got {fmt!r}")
    loaded = _load_run(run, runtime, operating_point)
    files = expand_inputs(inputs)
    predictions = []
    for prediction in tqdm(
        loaded.iter_predictions(files, batch_size=batch_size, gate=gate),
        total=len(files), desc="predicting", unit="img", disable=len(files) < 64,
    ):  # fmt: skip
        if prediction.error is not None:
            _echo_err(f"error: {prediction.path}: {prediction.error}")
        predictions.append(prediction)
    table = pd.DataFrame([p.to_dict() for p in predictions], columns=PREDICT_COLUMNS)
    table["operating_point"] = loaded.operating_point
    text = table.to_json(orient="records", indent=2) if fmt == "json" else table.to_csv(index=False)
    if out is None:
        typer.echo(text)
    else:
        atomic_write_text(out, text)
        typer.echo(f"{len(table)} predictions written to {out}", err=True)
    _echo_gate_summary(loaded, predictions, gate)
    _echo_err(DISCLAIMER)
    heatmap_failures = 0
    if heatmaps is not None:
        classified = [Path(p.path) for p in predictions if p.probability is not None]
        heatmap_failures = _write_heatmaps(loaded, classified, heatmaps, gate=False)
    if table["error"].notna().any() or heatmap_failures:
        raise typer.Exit(EXIT_PARTIAL)


def _predict_ray(run: Path, inputs: list[Path], out: Path | None, *, engine: str, heatmaps: Path | None,
                 **settings: Any) -> None:  # fmt: skip
    """``predict --engine ray``: the archive job (cxr_pneumonia.archive), a summary on stderr."""
    import pandas as pd

    from cxr_pneumonia.api import score_archive
    from cxr_pneumonia.archive import ArchiveError
    from cxr_pneumonia.config import ConfigError
    from cxr_pneumonia.rundir import DISCLAIMER, RunError

    if engine != "ray" or out is None or heatmaps is not None:
        raise CommandError("--engine is local or ray; ray needs --out DIR and draws no --heatmaps")
    try:
        summary = score_archive(run, inputs, out, **settings)
    except (ArchiveError, ConfigError, RunError, OSError) as e:
        raise CommandError(str(e)) from e
    table = pd.read_parquet(summary.predictions)
    for row in table[table["status"] == "error"].head(20).itertuples():
        _echo_err(f"error: {row.path}: {row.error}")
    _echo_err(
        f"{summary.images} predictions in {summary.predictions} ({summary.scored} scored now, "
        f"{summary.reused} already scored; {summary.rejected} rejected, {summary.errors} errors; "
        f"{summary.workers} workers, {summary.seconds:.1f} s)"
    )
    _echo_err(DISCLAIMER)
    if summary.errors:
        raise typer.Exit(EXIT_PARTIAL)


def _echo_gate_summary(run, predictions: list, gate: bool) -> None:
    """On stderr: how many images the input check rejected (or let through with --no-gate), how
    many are unusual, and one line when the batch as a whole is unlike the training data."""
    from cxr_pneumonia.evaluation import shift_warning
    from cxr_pneumonia.header import is_header_reason

    readable = [p for p in predictions if p.error is None]
    rejected = sum(p.status == "rejected" for p in readable)
    by_header = sum(p.status == "rejected" and is_header_reason(p.reason) for p in readable)
    unusual = sum(p.status == "ok" and p.unusual for p in readable)
    header_note = (
        f", {by_header} of them by their DICOM header (a lateral view, another modality or body part)"
        if by_header
        else ""
    )
    if rejected and gate:
        _echo_err(
            f"{rejected} of {len(readable)} images rejected: not like the frontal chest X-rays this model "
            f"was trained on{header_note} (no probability or label; --no-gate "
            "classifies them anyway)"
        )
    elif rejected:
        _echo_err(
            f"{rejected} of {len(readable)} images are not like the frontal chest X-rays this model was "
            f"trained on{header_note} and were classified anyway (--no-gate); their results are unreliable"
        )
    if unusual:
        _echo_err(f"{unusual} of {len(readable)} images accepted but unlike most of the training population")
    line = shift_warning(run.batch_shift(readable)) if readable else None
    if line:
        _echo_err(f"warning: {line}")


def _write_heatmaps(run, paths: list[Path], out_dir: Path, *, gate: bool = True) -> int:
    """Grad-CAM overlay PNGs; returns the number of images without one (unreadable or rejected)."""
    from cxr_pneumonia.explain import explain_paths

    failed = 0
    for result in explain_paths(run, paths, out_dir, gate=gate):
        if result.rejected:
            failed += 1
            _echo_err(f"skipped: {result.path}: {result.error} (--no-gate draws it anyway)")
        elif result.error is not None:
            failed += 1
            _echo_err(f"error: {result.path}: {result.error}")
    typer.echo(f"heatmaps: {out_dir}", err=True)
    return failed


# --------------------------------------------------------------------------------------------
# explain, serve
# --------------------------------------------------------------------------------------------


@app.command()
def explain(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory.")],
    images: Annotated[
        list[Path], typer.Argument(metavar="IMAGE...", help="Image files (JPEG/PNG/DICOM) and folders.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the <stem>_gradcam.png overlays.")],
    runtime: RuntimeOpt = "auto",
    gate: GateOpt = True,
    operating_point: OperatingPointOpt = None,
) -> None:
    """Grad-CAM overlays: preprocessed image, heatmap, probability and label. Research use only.

    None for an image the input check rejects unless --no-gate."""
    from cxr_pneumonia.explain import ExplainError
    from cxr_pneumonia.predict import expand_inputs
    from cxr_pneumonia.rundir import DISCLAIMER

    _check_writable(out, folder=True)
    loaded = _load_run(run, runtime, operating_point)
    files = expand_inputs(images)
    if not files:
        raise CommandError(f"no images found in {', '.join(map(str, images))}")
    try:
        failed = _write_heatmaps(loaded, files, out, gate=gate)
    except ExplainError as e:
        raise CommandError(str(e)) from e
    typer.echo(f"{len(files) - failed} of {len(files)} overlays written to {out}", err=True)
    _echo_err(DISCLAIMER)
    if failed:
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
def serve(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory.")],
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but 127.0.0.1 exposes the API.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, in MiB.", min=0.001)] = 20.0,
    runtime: RuntimeOpt = "auto",
    gate: Annotated[
        bool,
        typer.Option(
            "--gate/--no-gate",
            help="The input check's default for requests (a request's ?gate= wins): --no-gate "
            "classifies images unlike the training data anyway, marked as such.",
        ),
    ] = True,
    operating_point: OperatingPointOpt = None,
    workers: Annotated[int, typer.Option(help="Server processes (each loads the model).", min=1)] = 1,
    threads: Annotated[
        int | None, typer.Option(help="Model threads per process (default: cores / workers).", min=1)
    ] = None,
    max_batch: Annotated[
        int, typer.Option(help="Most concurrent images in one forward pass (1: no batching).", min=1)
    ] = 16,
    max_wait_ms: Annotated[
        float, typer.Option(help="Longest a request waits for others to share its pass.", min=0)
    ] = 5.0,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="File with an access token (chmod 600): nothing but /health answers without it "
            "(API: Bearer; the page and docs: the browser asks once)."
        ),
    ] = None,
) -> None:
    """REST API and web page (http://HOST:PORT/) for a trained run. Research use only."""
    from cxr_pneumonia.rundir import RunError
    from cxr_pneumonia.serve import serve as run_server

    try:
        run_server(
            run, host=host, port=port, max_upload_mb=max_upload_mb, runtime=runtime, gate=gate,
            operating_point=operating_point, workers=workers, threads=threads, max_batch=max_batch,
            max_wait_ms=max_wait_ms, token_file=token_file,
        )  # fmt: skip
    except (RunError, ValueError) as e:  # bad run, option or token file: one line, nothing listens
        raise CommandError(str(e)) from e


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors, exit 1 for usage errors (Click's default is 2)."""
    try:
        result = app(args=argv, standalone_mode=False)
    except CommandError as e:
        _echo_err(f"error: {e}")
        return EXIT_USAGE
    except (KeyboardInterrupt, typer.Abort):
        _echo_err("interrupted")
        return 130
    except typer.Exit as e:
        return int(getattr(e, "exit_code", EXIT_OK))
    except Exception as e:
        # Click's usage errors (typer vendors its own Click, so match by behaviour, not class).
        if callable(getattr(e, "show", None)) and hasattr(e, "exit_code"):
            e.show()
            return EXIT_USAGE
        raise
    return result if isinstance(result, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
