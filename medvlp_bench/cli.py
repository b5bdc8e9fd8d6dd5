"""``medbench``: run | pretrain | bench | leaderboard | list | compare | report | convert | data.

One style for every verb: what to run is Hydra-style ``key=value`` overrides (``method=clip
task=phantom_cxr_cls seed=1 trainer=gpu method.model.lr=3e-4``); how the command behaves is ``--flags``
(``--results DIR`` for every verb that reads or writes results, ``--dry-run`` for the verbs that would
train, ``--format`` for the verbs that print tables).
Lightning's DDP launcher re-runs ``sys.argv`` for the other ranks; since the verb stays in ``sys.argv``
(configs are composed with Hydra's compose API, not ``@hydra.main``) children get the same verb back.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

VERBS = ("run", "pretrain", "bench", "leaderboard", "list", "data", "compare", "report", "convert")
PASSTHROUGH = ("compare", "report", "convert")
#: the ``--results`` help of every verb (compare and report import it from here)
RESULTS_HELP = "results folder (default: $MEDBENCH_RESULTS, else $MEDBENCH_HOME/results, else ./results)"
DRY_RUN_HELP = {
    "run": "print the resolved cell (weights: given, cached or to pre-train; corpus; rows) and exit",
    "pretrain": "print the checkpoint folder and whether it is cached, and exit",
    "bench": "print every cell of the grid as done, stale, to run, excluded or not applicable, and exit",
}


def _setup_logging(verbose: bool, heavy: bool) -> None:
    """Rich log lines for our messages; Lightning's and MLflow's chatter down to warnings.

    Lightning sets its own logger level when imported, so it is imported first when the verb needs it.
    """
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    if verbose:  # datasets/_reader.py silences MONAI's per-file nvImageCodec notice unless a level is set first
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.DEBUG)
    if not heavy:
        return
    import lightning  # noqa: F401

    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "mlflow", "alembic", "httpx"):
        logger = logging.getLogger(noisy)
        logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
        logger.handlers.clear()
        logger.propagate = True
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")  # EMA teachers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medbench", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="verb", required=True)
    for verb, help_ in (
        ("run", "evaluate a method on a task (pre-training it first if needed)"),
        ("pretrain", "pre-train a method on a corpus"),
        ("bench", "run a suite: methods x tasks x label fractions x seeds"),
    ):
        sp = sub.add_parser(verb, help=help_)
        sp.add_argument("overrides", nargs="*", help="Hydra-style key=value overrides")
        sp.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP[verb])
        if verb != "pretrain":  # pre-training writes a checkpoint (paths.cache_dir), no results
            sp.add_argument("--results", default=None, help=RESULTS_HELP + "; the same as paths.results_dir=DIR")
    lb = sub.add_parser("leaderboard", help="aggregate result rows into leaderboard.csv/.md")
    lb.add_argument("--results", default=None, help=RESULTS_HELP)
    lb.add_argument("--format", choices=("csv", "md"), default="md", help="what to print")
    sub.add_parser("list", help="methods, tasks, datasets, suites and trainers found in the configs")
    cp = sub.add_parser(
        "compare", add_help=False, help="paired test of method A vs B on one task (DeLong for AUROC, else bootstrap)"
    )
    cp.add_argument("args", nargs=argparse.REMAINDER)
    rp = sub.add_parser(
        "report", add_help=False, help="self-contained HTML report: leaderboard, label-efficiency curves, paired tests"
    )
    rp.add_argument("args", nargs=argparse.REMAINDER)
    cv = sub.add_parser("convert", add_help=False, help="import the authors' released weights (brainmvp, gtgm)")
    cv.add_argument("args", nargs=argparse.REMAINDER)
    dp = sub.add_parser("data", help="real datasets: list | check <data> [key=value ...] | splits <data> [...]")
    dp.add_argument("action", choices=("list", "check", "splits"))
    dp.add_argument("name", nargs="?", help="a data config (configs/data/<name>.yaml), for check and splits")
    dp.add_argument(
        "overrides", nargs="*", help="root=..., paths.data_dir=..., workers=N, limit=N; splits: out=DIR, seeds=[0,1,2]"
    )
    return p


def cmd_list() -> int:
    from .config import options, task_shortcuts

    for group in ("method", "task", "data", "suite", "trainer", "logger"):
        print(f"{group}: {', '.join(options(group))}")
    short = ", ".join(f"{data} -> {task}" for data, task in task_shortcuts().items())
    print(f"task shortcuts (task=<dataset> runs its main task): {short}")
    _list_external()
    return 0


#: the readers of a user's own data; the tasks on them take ``task.data.root=...`` (docs/external.md)
OWN_DATA = ("imagefolder", "image_text_csv", "nifti_folder")


def _list_external() -> None:
    """The ``external`` model formats and the tasks that run on a user's own data (their yaml's ``defaults`` put
    one of ``OWN_DATA`` at ``data``)."""
    from .config import options, search_dirs
    from .methods.external_formats import FORMATS

    print("external models (method=external external.format=<f> external.path=...):")
    for fmt, what in FORMATS.items():
        print(f"  {fmt}: {what}")
    mine = []
    for task in options("task"):
        text = next((f.read_text() for d in search_dirs() if (f := d / "task" / f"{task}.yaml").is_file()), "")
        if any(f"/data@data: {name}\n" in text for name in OWN_DATA):
            mine.append(task)
    print(f"tasks on your own data (task.data.root=...): {', '.join(mine)}")


def cmd_leaderboard(results_dir: str | None, fmt: str) -> int:
    from .results import leaderboard_markdown, write_leaderboard
    from .results import results_dir as find_results

    folder = find_results(results_dir)
    lb = write_leaderboard(folder)
    print(lb.to_csv(index=False) if fmt == "csv" else leaderboard_markdown(lb), end="")
    print(f"\nwrote {folder / 'leaderboard.csv'} and {folder / 'leaderboard.md'} ({len(lb)} rows)", file=sys.stderr)
    return 0


def with_results(overrides: list[str], results_dir: str | None) -> list[str]:
    """``--results DIR`` as the ``paths.results_dir`` override (first, so an explicit override still wins)."""
    if not results_dir:
        return list(overrides)
    from .config import quoted

    return [f"paths.results_dir={quoted(Path(results_dir).expanduser().resolve())}", *overrides]


def cmd_run(overrides: list[str], dry_run: bool = False) -> int:
    from .cell import resolve
    from .run import evaluate

    cell = resolve(overrides)
    if dry_run:
        from .preflight import check_cell

        print(cell.describe())
        if cell.gap is None:
            check_cell(cell.cfg)  # a missing dataset or a bad ckpt= is an error here too, in seconds
        return 0
    rows = evaluate(cell)
    for r in rows:
        print(f"{r.task}\t{r.method}\t{r.protocol}\t{r.label_fraction:g}\ts{r.seed}\t{r.metric}\t{r.value:.4f}")
    return 0


def cmd_pretrain(overrides: list[str], dry_run: bool = False) -> int:
    from .checkpoint import checkpoint_dir, is_checkpoint
    from .config import compose
    from .run import pretrain

    cfg = compose("pretrain", overrides)
    if dry_run:
        from .preflight import check_pretrain

        folder = checkpoint_dir(cfg)
        sched = cfg.method.pretrain
        state = "cached" if is_checkpoint(folder) else "to train"
        print(f"{cfg.names.method} on {cfg.names.data} (seed {cfg.seed}, {sched.max_epochs} epochs, "
              f"batch {sched.batch_size}): {state}: {folder}")  # fmt: skip
        if state == "to train":
            check_pretrain(cfg)  # what the real run checks before training: method, corpus, data
        return 0
    print(pretrain(cfg))
    return 0


def cmd_bench(overrides: list[str], dry_run: bool = False) -> int:
    from .bench import bench, compose_bench
    from .bench import dry_run as plan_only
    from .results import leaderboard_markdown

    cfg, passthrough = compose_bench(overrides)
    if dry_run:
        print(plan_only(cfg, passthrough))
        return 0
    report = bench(cfg, passthrough)
    print(leaderboard_markdown(report.leaderboard))
    busy = f", {len(report.busy)} running in another process" if report.busy else ""
    na = f", {len(report.inapplicable)} not applicable (reasons in the log)" if report.inapplicable else ""
    na += f", {len(report.excluded)} excluded by the suite (`exclude:`)" if report.excluded else ""
    stale = f" ({len(report.stale)} stale: stored at other method/task versions)" if report.stale else ""
    print(
        f"{len(report.done)} cells run{stale}, {len(report.skipped)} already done{busy}{na}, "
        f"{len(report.failed)} failed "
        f"in {report.seconds:.0f} s; leaderboard: {Path(cfg.paths.results_dir) / 'leaderboard.csv'}"
    )
    for name, err in report.failed.items():
        print(f"FAILED {name}: {err}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_data(action: str, name: str | None, overrides: list[str]) -> int:
    from .datacli import data_check, data_list, data_splits

    if action == "list":
        print(data_list(), end="")
        return 0
    if not name:
        example = f"medbench data {action} rsna root=/data/rsna"
        print(f"medbench data {action}: name a data config, e.g. {example}", file=sys.stderr)
        return 2
    return (data_check if action == "check" else data_splits)(name, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.verb in PASSTHROUGH:  # these verbs parse their own options (argparse REMAINDER drops a leading --opt)
        args.args = argv[argv.index(args.verb) + 1 :]
    else:
        if args.verb in ("run", "pretrain", "bench"):  # overrides after a --flag: argparse leaves them over
            args.overrides += [e for e in extra if not e.startswith("-")]
            extra = [e for e in extra if e.startswith("-")]
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose, heavy=args.verb in ("run", "pretrain", "bench"))
    from .config import ConfigError
    from .datasets._errors import DataError
    from .results import ResultsWriteError

    try:
        if args.verb == "list":
            return cmd_list()
        if args.verb == "compare":
            from .stats import main_compare

            return main_compare(args.args)
        if args.verb == "report":
            from .report import main_report

            return main_report(args.args)
        if args.verb == "convert":
            from .convert import main_convert

            return main_convert(args.args)
        if args.verb == "data":
            return cmd_data(args.action, args.name, args.overrides)
        if args.verb == "leaderboard":
            return cmd_leaderboard(args.results, args.format)
        verb = {"run": cmd_run, "pretrain": cmd_pretrain, "bench": cmd_bench}[args.verb]
        return verb(with_results(args.overrides, getattr(args, "results", None)), args.dry_run)
    except (ConfigError, FileNotFoundError, DataError, ResultsWriteError) as e:
        print(f"medbench {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
