"""The --ray options of `fxscore run`: how each other option behaves with --ray, and the
check that refuses what cannot work. Kept out of `fxscore.rayrun`, whose imports a run without
--ray (and `fxscore --help`) should not pay for."""
from __future__ import annotations

from typing import Callable

import click

LOCAL, AUTO = "local", "auto"
DEFAULT_ACTOR_CPUS = 4  # onnxruntime gains little from more threads on one ResNet18 batch
# ...and at least two actors per node by default: one actor's decoding then overlaps the
# other's inference. On 2 cores, 2 actors x 1 CPU reached 90% of single-process throughput
# and 1 x 2 only 82% (benchmarks/bench_ray.py, README).
MIN_ACTORS_PER_NODE = 2
TASK_BATCHES = 8  # default files per Ray task: this many model batches (--ray-batch-size)

# How every `run` option behaves with --ray. An option missing from both sets is refused, so a
# new option has to be decided on (tests/test_rayoptions.py checks that every one is).
WORKS_WITH_RAY = frozenset({
    "input_path", "model_path", "out", "fmt", "overwrite", "threshold", "retry_errors",
    "follow_links", "batch_size", "threads", "workers", "max_memory", "provider", "shard",
    "list_ignored", "summary_json", "quiet",
    # DICOM selection, columns and the decoder time limit: applied by score_batches in the
    # actors (run_job's `dicom`), excluded files counted by the driver's writer as without Ray
    "modalities", "for_processing", "dicom_columns", "decode_timeout",
    "mark_training_copies",  # marked by run_job at the driver, from each row's sha256
    "ray", "ray_cpus", "ray_actors", "ray_batch_size"})
# option -> why it is refused (values of a working option that are refused: see check_options)
REFUSED_WITH_RAY = {
    "sr_out": "an SR is written by the process that scored its image, which on Ray is any "
              "node; write SRs without --ray, or per --shard",
    "heatmaps": "heatmap images are written by the scoring process; run it without --ray",
    "heatmaps_for": "it belongs to --heatmaps, which does not work with --ray",
}
RAY_HELP = (
    "score on a Ray cluster: 'local' starts one on this machine (listening on 127.0.0.1 "
    "only), 'auto' joins the running cluster (`ray start`, $RAY_ADDRESS), or a cluster "
    "ADDRESS (host:port). INPUT must be mounted at the same path on every node. Works with "
    "every other option (--threads, --workers and --max-memory then apply per actor) except "
    "--out - (stdout cannot be resumed), --provider cuda, --sr-out and --heatmaps: refused "
    "(exit 2). Needs fxscore[ray]")


def parse_actors(text: str) -> tuple[int, int]:
    """'4' -> (4, 4), a fixed pool; '2,8' -> (2, 8), a pool Ray grows from 2 to 8 actors."""
    parts = str(text).replace(" ", "").split(",")
    try:
        low, high = (int(parts[0]), int(parts[0])) if len(parts) == 1 else map(int, parts)
    except ValueError:
        raise ValueError(f"expected N or MIN,MAX actors (e.g. 4 or 2,8), got {text!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"actors need 1 <= MIN <= MAX, got {text!r}")
    return low, high


def _actors_callback(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    try:
        return parse_actors(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def ray_options(f: Callable) -> Callable:
    """The --ray* options of `fxscore run` (one decorator, so cli.py has one line for them)."""
    f = click.option("--ray-batch-size", type=click.IntRange(1), default=None, metavar="N",
                     help=f"files per Ray task [default: {TASK_BATCHES} x --batch-size]")(f)
    f = click.option("--ray-actors", callback=_actors_callback, default=None, metavar="N|MIN,MAX",
                     help="scoring actors: a fixed pool of N, or one Ray grows from MIN to MAX "
                          "[default: as many as the cluster's CPUs hold]")(f)
    f = click.option("--ray-cpus", type=click.IntRange(1), default=None, metavar="N",
                     help="CPUs of the cluster --ray local starts [default: the CPUs this "
                          "process may use]; each actor takes --threads of them [default: "
                          f"{DEFAULT_ACTOR_CPUS}, or half the smallest node's CPUs if "
                          "fewer]")(f)
    f = click.option("--ray", "ray", default=None, metavar="auto|local|ADDRESS",
                     help=RAY_HELP)(f)
    return f


def check_options(ctx: click.Context) -> None:
    """Refuse (click.UsageError: exit 2) the `run` options that cannot work with --ray."""
    from click.core import ParameterSource

    p = ctx.params
    given = {name for name in p
             if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT,
                                                       ParameterSource.DEFAULT_MAP)}
    if not p.get("ray"):
        stray = sorted(n for n in given if n.startswith("ray_"))
        if stray:
            raise click.UsageError(f"{_flag(stray[0])} needs --ray", ctx)
        return
    problems = []
    if p.get("out") == "-":
        problems.append("--out - (stdout cannot be resumed; give --out FILE, which a killed "
                        "run resumes from)")
    if p.get("provider") not in (None, "cpu"):
        problems.append(f"--provider {p['provider']} (actors run on CPUs)")
    if "ray_cpus" in given and p["ray"] != LOCAL:
        problems.append("--ray-cpus with a running cluster (it sizes the cluster --ray local "
                        "starts; a running cluster has its own)")
    for name in sorted(given - WORKS_WITH_RAY):
        why = REFUSED_WITH_RAY.get(name, "it has not been made to work with --ray yet")
        problems.append(f"{_flag(name)} ({why})")
    if problems:
        raise click.UsageError("these options do not work with --ray: " + "; ".join(problems),
                               ctx)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
