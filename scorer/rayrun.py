"""`fxscore run --ray`: the same job on a Ray cluster, with Ray Data doing the scoring.

The driver (this process) owns the truth and runs `fxscore.runner.run_job` unchanged: it lists
the files (same rules, same --shard), reads the resume state, drops stale rows and writes every
row through the same writer, so output format, resume, --retry-errors and the summary are
shared code. Only the scoring loop (`run_job(score=...)`) is replaced by `RayScore`:

1. **Feed.** The files to score are written, as they are listed, to a spill file on the
   driver's local disk (`Spill`: NUL-separated paths), so the driver does not hold the path
   list. One Ray Data dataset covers the whole run: `from_items` of one small descriptor
   (offset, count, first index) per slice of a Ray task's files, then `read_slices` (at most
   READERS tasks, pinned to the driver's node, 0 CPUs) turns each into its paths. The driver
   keeps Ray Data's bookkeeping of the descriptors (about 20 bytes per file, 20 MiB for a
   million) and a bitmap, 1 bit per file. One dataset means one actor pool for the run:
   starting a pool costs seconds (a worker process per actor importing Ray Data, the model
   load), which per chunk of files would be paid again and again.
2. **Score.** `map_batches(ScoreActor, ...)`: a pool of actors, each loading the model once
   (sent as bytes from the driver, checked against its model id, so nodes need no copy of it)
   with onnxruntime's intra-op threads set to the actor's CPUs and inter-op threads to 1. Each
   batch of paths goes through `scoring.score_batches`, the single-process code: the file is
   read once through fxscore's reader (every format, DICOM included; Ray's `read_images`
   skips DICOM), hashed, decoded and preprocessed by the one preprocessing function. A file
   that fails to decode, or that a node cannot see, is an error row.
3. **Write.** Rows come back in the order Ray finishes them and go straight to the writer.
   Every row carries its file's index in the spill, and a bitmap of written indices drops a
   second row for a file (a task retried after its actor died returns its rows again), so no
   path is ever written twice. Files whose rows never came back (their task failed
   `TASK_RETRIES` times, e.g. a worker killed again and again) are resubmitted one file per
   task; those failing again become error rows that name the cause, not a failed job.

Faults: Ray restarts a killed actor and retries its tasks; killing the driver leaves the rows
written so far on disk, and rerunning the same command resumes like a single-process run.
Safe defaults: usage statistics off (RAY_USAGE_STATS_ENABLED=0); `--ray local` starts a
cluster whose every port listens on 127.0.0.1 only, without a dashboard.

Nothing here imports Ray at module level: `import fxscore` (and `fxscore --help`) never does.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from .rayoptions import AUTO, DEFAULT_ACTOR_CPUS, LOCAL, MIN_ACTORS_PER_NODE, TASK_BATCHES

if TYPE_CHECKING:
    from .model import Model
    from .runner import Summary

RAY_HINT = 'the --ray options need Ray: pip install "fxscore[ray]"'
READERS = 2  # concurrent tasks reading the spill file (each takes microseconds per file)
TASK_RETRIES = 3  # retries of a task whose actor died, before its files are resubmitted alone
FATAL_KEY = "__fxscore_fatal__"  # a row dict with this key: the actor hit a job-ending error

def default_actor_cpus(node_cpus: list[int]) -> int:
    """CPUs per actor when --threads is not given: 4, fewer on small nodes (two actors each)."""
    return max(1, min(DEFAULT_ACTOR_CPUS, min(node_cpus) // MIN_ACTORS_PER_NODE))


# ---- settings and statistics ---------------------------------------------------------------------

@dataclass(frozen=True)
class RaySettings:
    """How a run uses Ray; None means the default described in `ray_options`."""

    address: str = LOCAL  # "local", "auto" or a cluster address
    cpus: int | None = None  # CPUs of a local cluster
    actors: tuple[int, int] | None = None  # (min, max) pool size
    task_files: int | None = None  # files per Ray task
    actor_cpus: int | None = None  # CPUs (= onnxruntime threads) per actor
    workers: int | None = None  # decode threads per actor [= actor_cpus]
    max_memory: int | None = None  # decode budget per actor, bytes
    task_retries: int = TASK_RETRIES


@dataclass
class RayStats:
    """What the Ray side of a run did (for tests, the benchmark and the closing line)."""

    files: int = 0  # files fed to Ray
    nodes: int = 0
    actors: tuple[int, int] = (0, 0)
    actor_cpus: int = 0
    duplicates: int = 0  # rows dropped because their file already had one
    resubmitted: int = 0  # files sent again, alone, after their task failed
    lost: int = 0  # files that failed alone too: written as error rows
    connect_s: float = 0.0  # starting or joining the cluster
    spill_s: float = 0.0  # the second listing, written to the spill file
    first_row_s: float | None = None  # from the dataset's start to its first rows
    events: list[str] = field(default_factory=list)


# ---- connecting ------------------------------------------------------------------------------------

def import_ray():
    """Import Ray with usage statistics off, or raise RunError saying how to install it."""
    from .runner import RunError

    # Before the import: Ray reads it then, and the processes a local cluster starts inherit it.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RunError(f"{RAY_HINT} ({e})") from None
    return ray


@contextlib.contextmanager
def ray_cluster(address: str = LOCAL, *, cpus: int | None = None) -> Iterator[Any]:
    """Start (`local`) or join (`auto`, an address) a Ray cluster for the `with` block.

    Yields the ray module. A cluster that is already initialised in this process is used as it
    is and left running; one started here is shut down at the end. A local cluster advertises
    and listens on 127.0.0.1 only, has no dashboard, and keeps Ray's token authentication.
    """
    from .cpus import available_cpus
    from .runner import RunError

    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address.startswith("ray://"):
        raise RunError(f"--ray {address}: Ray Client addresses are not supported (the driver "
                       "must run on a node of the cluster, which reads its spill file); run "
                       "fxscore on a cluster node with --ray auto, or with `ray job submit`")
    quiet = dict(include_dashboard=False, logging_level=logging.ERROR)
    try:
        if address == LOCAL:
            with _loopback_only(ray):
                ray.init(address="local", num_cpus=cpus or available_cpus(),
                         _node_ip_address="127.0.0.1", **quiet)
            node_ip = ray.util.get_node_ip_address()
            if node_ip != "127.0.0.1":  # a Ray that ignores the switch: do not run exposed
                ray.shutdown()
                raise RunError(f"the local Ray cluster would listen on {node_ip}, not only on "
                               "127.0.0.1, with this Ray version; install the one fxscore[ray] "
                               "is tested with (see pyproject.toml)")
        else:
            # A cluster on 127.0.0.1 (another `--ray local` process, a test's) is reached only
            # with the same switch, or Ray dials the host's public address instead.
            loopback = _loopback_only(ray) if _is_loopback(_resolve(ray, address)) else (
                contextlib.nullcontext())
            with loopback:
                ray.init(address=address, **quiet)
    except RunError:
        raise
    except (ConnectionError, RuntimeError, ValueError) as e:
        what = ("start a local Ray cluster" if address == LOCAL
                else f"join the Ray cluster at {address}")
        hint = "" if address == LOCAL else (
            "; start one with `ray start --head`, or use --ray local" + (
                "; if it uses token authentication, set RAY_AUTH_MODE=token and its token "
                "(RAY_AUTH_TOKEN, or ~/.ray/auth_token) here too"
                if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" else ""))
        raise RunError(f"cannot {what}: {_first_line(e)}{hint}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _loopback_only(ray) -> Iterator[None]:
    # Ray turns "127.0.0.1" into the host's reachable address, and its servers then listen on
    # every interface, unless it believes it runs a single-machine cluster (its switch for
    # macOS and Windows, read through ray_constants). With it, the node's address is 127.0.0.1
    # and every server binds to it (tests/test_rayrun.py checks the listening sockets). Set
    # only for the start: a driver joining a real cluster must advertise its real address.
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def _resolve(ray, address: str) -> str:
    """The host:port `address` stands for ('auto': $RAY_ADDRESS, else the last `ray start`)."""
    if address != AUTO:
        return address
    try:
        from ray._private.services import get_ray_address_from_environment

        return get_ray_address_from_environment(address, None) or address
    except Exception:  # noqa: BLE001 - a private helper; without it, join as Ray would
        return address


def _is_loopback(address: str) -> bool:
    import ipaddress

    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---- the spill file: the list of files to score, on the driver's disk -------------------------------

SPILL_PREFIX = "fxscore-ray-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_dead_spills(folder: str | None = None) -> list[Path]:
    """Remove this user's spill files whose driver is no longer running; returns them."""
    removed = []
    root = Path(folder or tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for f in root.glob(f"{SPILL_PREFIX}*-*.todo"):
            pid = f.name[len(SPILL_PREFIX):].split("-", 1)[0]
            try:
                if not pid.isdigit() or _running(int(pid)) or f.stat().st_uid != os.getuid():
                    continue
                f.unlink()
                removed.append(f)
            except OSError:  # gone meanwhile, or not ours to remove
                continue
    return removed


class Spill:
    """The files to score, written as they are listed: `rel NUL path NUL` per file.

    The file lives in the driver's temporary folder and is removed by `close`; `slices(n)`
    describes it to Ray as (offset, count, first index) per n files. Its name carries the
    driver's pid: a driver that was killed cannot remove its file, which lists patients' file
    paths, so each new one first removes the files of drivers that are no longer running.
    """

    def __init__(self, items: Iterable[tuple[str, Path]], folder: str | None = None) -> None:
        sweep_dead_spills(folder)
        fd, self.path = tempfile.mkstemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", suffix=".todo",
                                         dir=folder)
        self.count = 0
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as f:
                for rel, path in items:
                    f.write(os.fsencode(rel) + b"\0" + os.fsencode(path) + b"\0")
                    self.count += 1
        except BaseException:
            self.close()
            raise

    def slices(self, n: int) -> list[tuple[int, int, int]]:
        """(offset, count, first index) of each run of n files, from a pass over the file."""
        out: list[tuple[int, int, int]] = []
        start = offset = index = 0
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 20):
                pos = 0
                while (nul := chunk.find(b"\0", pos)) >= 0:
                    pos = nul + 1
                    index += 1
                    if index % (2 * n) == 0:
                        out.append((start, n, index // 2 - n))
                        start = offset + pos
                offset += len(chunk)
        files = index // 2
        if files % n:
            out.append((start, files % n, files - files % n))
        return out

    def entries(self, wanted: Callable[[int], bool]) -> Iterator[tuple[int, bytes, bytes]]:
        """(index, rel, path) of every file with wanted(index), read back in bounded chunks."""
        with open(self.path, "rb") as f:
            index, buf = 0, b""
            while chunk := f.read(1 << 20):
                buf += chunk
                fields = buf.split(b"\0")
                buf = fields.pop()  # an incomplete field, or b""
                if len(fields) % 2:  # keep pairs together
                    buf = fields.pop() + b"\0" + buf
                for i in range(0, len(fields), 2):
                    if wanted(index):
                        yield index, fields[i], fields[i + 1]
                    index += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def read_slices(batch: dict, spill: str) -> dict:
    """Ray Data stage (a task on the driver's node): slice descriptors -> their files."""
    import numpy as np

    index, rels, paths = [], [], []
    with open(spill, "rb") as f:
        for offset, count, first in zip(batch["offset"], batch["count"], batch["first"]):
            f.seek(int(offset))
            data, fields = b"", []
            while len(fields) < 2 * int(count) + 1:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                data += chunk
                fields = data.split(b"\0", 2 * int(count))
            if len(fields) < 2 * int(count) + 1:
                raise RuntimeError(f"{spill}: truncated at slice {first}")
            index.extend(range(int(first), int(first) + int(count)))
            rels.extend(fields[0:2 * int(count):2])
            paths.extend(fields[1:2 * int(count):2])
    return {"i": np.array(index, dtype=np.int64), "rel": np.array(rels, dtype=object),
            "path": np.array(paths, dtype=object)}


# ---- the actor -------------------------------------------------------------------------------------

class ScoreActor:
    """What Ray Data runs in every actor of the pool: the model, loaded once, scoring batches.

    Constructed by Ray with the model's bytes (an ObjectRef, or bytes), the model id the
    driver loaded (the bytes must hash to it), and the single-process scoring settings.
    """

    def __init__(self, model_bytes: Any, model_id: str, model_path: str, threshold: float,
                 batch_size: int, threads: int, workers: int | None, max_memory: int | None,
                 driver_node: str | None = None, score_options: dict | None = None) -> None:
        from .model import ModelError, load_model
        from .runner import default_max_memory

        if not isinstance(model_bytes, (bytes, bytearray, memoryview)):
            import ray

            model_bytes = ray.get(model_bytes)
        with tempfile.TemporaryDirectory(prefix="fxscore-actor-") as tmp:
            copy = Path(tmp) / (Path(model_path).name or "model.onnx")
            copy.write_bytes(model_bytes)
            # threads: onnxruntime's intra-op pool = the actor's CPUs, inter-op 1; Ray's
            # OMP_NUM_THREADS=1 does not reach onnxruntime, which would size itself to the host.
            model = load_model(copy, threads=threads)
        if model.model_id != model_id:
            raise ModelError(f"model {model_path}: the Ray actor received model {model.model_id}, "
                             f"not {model_id}")
        self.model = replace(model, path=Path(model_path))  # messages name the user's file
        self.threshold, self.batch_size = threshold, batch_size
        self.workers = workers or threads
        self.max_memory = max_memory or max(1 << 28, default_max_memory() * threads
                                            // max(1, _host_cpus()))
        self.driver_node, self.node = driver_node, _node()
        self.score_options = dict(score_options or {})  # more of score_batches' keywords
        # Compressed DICOM is decoded in worker processes of this actor, as in a single-process
        # run (a decoder crash costs one error row, not the actor); none start without one.
        from .scoring import make_isolated

        dicom = self.score_options.get("dicom")
        self.isolated = make_isolated(self.workers, dicom.decode_timeout if dicom else None)
        self.score_options["isolated"] = self.isolated

    def __del__(self) -> None:  # Ray Data drops the callable when the actor's work is done
        isolated = getattr(self, "isolated", None)
        if isolated is not None:
            isolated.close()

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .scoring import score_batches

        items = [(os.fsdecode(bytes(r)), Path(os.fsdecode(bytes(p))))
                 for r, p in zip(batch["rel"], batch["path"])]
        try:
            rows = [row for rows in score_batches(
                self.model, items, batch_size=self.batch_size, workers=self.workers,
                memory=self.max_memory, threshold=self.threshold, **self.score_options)
                for row in rows]
        except Exception as e:  # noqa: BLE001 - a broken model ends the job, as without Ray
            from .model import ModelError

            fatal = {FATAL_KEY: str(e) if isinstance(e, ModelError)
                     else f"Ray actor on node {self.node}: {type(e).__name__}: {e}",
                     "model_error": isinstance(e, ModelError)}
            return {"i": np.array([-1], dtype=np.int64),
                    "row": np.array([pickle.dumps(fatal)], dtype=object)}
        # Rows are matched to the files by path (unique in a listing): a file that gets no row
        # (one that scoring leaves out) comes back as None, so the driver knows it is done.
        index = {rel: int(i) for (rel, _), i in zip(items, batch["i"])}
        paths = dict(items)
        out_i, out_rows = [], []
        for row in rows:
            rel = row["path"]
            if (self.driver_node and self.node != self.driver_node and row["error"]
                    and not row["sha256"] and not os.path.lexists(paths[rel])):
                row["error"] += (f" (on Ray node {self.node}: with --ray, INPUT must be on a "
                                 "filesystem every node mounts at the same path)")
            out_i.append(index.pop(rel))
            out_rows.append(pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL))
        for i in index.values():
            out_i.append(i)
            out_rows.append(pickle.dumps(None))
        return {"i": np.array(out_i, dtype=np.int64), "row": np.array(out_rows, dtype=object)}


def _node() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (tests construct the actor directly)
        return "local"


def _host_cpus() -> int:
    from .cpus import available_cpus

    return available_cpus()


# ---- the driver's scoring loop ------------------------------------------------------------------------

class RayScore:
    """`run_job(score=RayScore(...))`: the files to score -> batches of rows, scored on Ray."""

    def __init__(self, model: "Model", settings: RaySettings, *, threshold: float,
                 batch_size: int = 32, stats: RayStats | None = None,
                 warn: Callable[[str], None] | None = None,
                 score_options: dict | None = None) -> None:
        self.model, self.settings, self.threshold = model, settings, float(threshold)
        self.batch_size, self.score_options = batch_size, dict(score_options or {})
        self.stats = stats if stats is not None else RayStats()
        self.warn = warn or (lambda message: None)

    def __call__(self, todo: Iterable[tuple[str, Path]]) -> Iterator[list[dict]]:
        return self._run(todo)

    def _run(self, todo: Iterable[tuple[str, Path]]) -> Iterator[list[dict]]:
        s, stats = self.settings, self.stats
        t = time.monotonic()
        spill = Spill(todo)
        stats.spill_s, stats.files = round(time.monotonic() - t, 3), spill.count
        try:
            if spill.count == 0:  # resumed with nothing left: no cluster needed
                return
            t = time.monotonic()
            with ray_cluster(s.address, cpus=s.cpus) as ray, _quiet_ray_data() as context:
                stats.connect_s = round(time.monotonic() - t, 3)
                yield from self._score(ray, context, spill)
        finally:
            spill.close()

    def _score(self, ray, context, spill: Spill) -> Iterator[list[dict]]:
        from .runner import RunError

        s, stats = self.settings, self.stats
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
        if not nodes:
            raise RunError("the Ray cluster has no node with a CPU to score on")
        node_cpus = [int(n["Resources"]["CPU"]) for n in nodes]
        actor_cpus = s.actor_cpus or default_actor_cpus(node_cpus)
        if actor_cpus > max(node_cpus):
            raise RunError(f"--threads {actor_cpus}: no node of the Ray cluster has that many "
                           f"CPUs (the largest has {max(node_cpus)}); give fewer")
        fit = max(1, sum(c // actor_cpus for c in node_cpus))
        if s.actors is None:  # as many actors as fit, but none without a model batch to run
            low = high = max(1, min(fit, math.ceil(spill.count / self.batch_size)))
        else:
            low, high = s.actors
        # A few tasks per actor at least, so that every actor has work and rows stream in;
        # at most TASK_BATCHES model batches per task, so that a retried task repeats little.
        task_files = s.task_files or min(TASK_BATCHES * self.batch_size, max(
            self.batch_size, math.ceil(spill.count / (4 * high))))
        actors = (low, high)
        stats.nodes, stats.actors, stats.actor_cpus = len(nodes), actors, actor_cpus
        driver_node = ray.get_runtime_context().get_node_id()
        model_bytes = self.model.path.read_bytes()
        from .hashing import sha256_bytes

        if sha256_bytes(model_bytes)[:12] != self.model.model_id:
            raise RunError(f"model {self.model.path} changed on disk since it was loaded; rerun")
        model_ref = ray.put(model_bytes)
        del model_bytes
        actor_args = dict(model_bytes=model_ref, model_id=self.model.model_id,
                          model_path=str(self.model.path), threshold=self.threshold,
                          batch_size=self.batch_size, threads=actor_cpus, workers=s.workers,
                          max_memory=s.max_memory, driver_node=ray.util.get_node_ip_address(),
                          score_options=self.score_options)
        done = bytearray(math.ceil(spill.count / 8))  # one bit per file: its row is written

        def is_done(i: int) -> bool:
            return bool(done[i >> 3] & (1 << (i & 7)))

        def run(source: Spill, files: int, pool: tuple[int, int]) -> Iterator[list[dict]]:
            ds = _dataset(ray, source, driver_node, actor_args, files, pool, actor_cpus,
                          s.task_retries)
            t = time.monotonic()
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    if stats.first_row_s is None:
                        stats.first_row_s = round(time.monotonic() - t, 3)
                    rows = []
                    for i, blob in zip(batch["i"], batch["row"]):
                        row = pickle.loads(blob)
                        if row is not None and FATAL_KEY in row:
                            _fatal(row)
                        i = source_index(source, int(i))
                        if is_done(i):
                            stats.duplicates += 1
                            continue
                        done[i >> 3] |= 1 << (i & 7)
                        if row is not None:
                            rows.append(row)
                    if rows:
                        yield rows
            except ray.exceptions.RayError as e:
                raise RunError(f"the Ray job failed: {_first_line(e)} (is this fxscore, "
                               "with the [ray] extra, installed on every node?)") from None

        def source_index(source: Spill, i: int) -> int:
            return i if source is spill else source.origin[i]

        yield from run(spill, task_files, actors)
        missing = spill.count - sum(bin(b).count("1") for b in done)
        if not missing:
            return
        # Tasks that failed TASK_RETRIES times (their actor killed each time) lost their files'
        # rows: send those files again, one per task, so that one bad file cannot take others
        # with it, and write an error row for each that fails alone too.
        stats.resubmitted += missing
        self.warn(f"ray: {missing} file(s) whose task failed are scored again, one per task")
        retry = _Resubmit(spill, lambda i: not is_done(i))
        try:
            yield from run(retry, 1, (1, actors[1]))
            lost = [(i, rel, path) for i, rel, path in spill.entries(lambda i: not is_done(i))]
        finally:
            retry.close()
        if not lost:
            return
        if len(lost) == missing and missing > 8:
            raise RunError(f"Ray tasks keep failing: none of the {missing} files resubmitted "
                           "came back; see Ray's messages above (a node or worker crash loop?)")
        stats.lost += len(lost)
        for i, *_ in lost:
            done[i >> 3] |= 1 << (i & 7)
        yield [self._lost_row(os.fsdecode(rel), os.fsdecode(path)) for _, rel, path in lost]

    def _lost_row(self, rel: str, path: str) -> dict:
        why = (f"{path}: not scored: the Ray worker scoring it died {self.settings.task_retries + 1} "
               "times, then again when it was scored alone (a crash in a decoder, or the "
               "node ran out of memory?); rerun with --retry-errors to try again")
        return {"path": rel, "probability": None, "label": "", "threshold": self.threshold,
                "model_id": self.model.model_id, "sha256": "", "error": why}


class _Resubmit(Spill):
    """A spill of the files not yet done; `origin[i]` is file i's index in the first spill."""

    def __init__(self, spill: Spill, wanted: Callable[[int], bool]) -> None:
        self.origin: list[int] = []
        entries = spill.entries(wanted)

        def items() -> Iterator[tuple[str, str]]:
            for i, rel, path in entries:
                self.origin.append(i)
                yield os.fsdecode(rel), os.fsdecode(path)

        super().__init__(items(), folder=os.path.dirname(spill.path))


def _fatal(row: dict) -> None:
    from .model import ModelError
    from .runner import RunError

    raise (ModelError if row.get("model_error") else RunError)(row[FATAL_KEY])


def _dataset(ray, spill: Spill, driver_node: str, actor_args: dict, task_files: int,
             actors: tuple[int, int], actor_cpus: int, task_retries: int):
    """One dataset for the run: descriptors -> paths (driver's node) -> rows (the actor pool)."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    low, high = actors
    pool = ActorPoolStrategy(size=low) if low == high else ActorPoolStrategy(min_size=low,
                                                                             max_size=high)
    items = [{"offset": o, "count": c, "first": i} for o, c, i in spill.slices(task_files)]
    with warnings.catch_warnings():
        # max_task_retries has no named parameter in Ray Data yet (it warns that such remote
        # arguments are deprecated); without it, a file that kills its worker is retried for
        # ever, and the run never ends.
        warnings.simplefilter("ignore")
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # The spill is on the driver's disk: its reader runs there, as READERS tasks at most
        # (0 CPUs would otherwise let Ray start a worker process per slice at once). Its
        # num_cpus differs from the actors', so Ray Data cannot fuse it into them.
        ds = ds.map_batches(read_slices, batch_size=1, fn_kwargs={"spill": spill.path},
                            num_cpus=0, compute=TaskPoolStrategy(size=READERS),
                            label_selector={"ray.io/node-id": driver_node})
        ds = ds.map_batches(ScoreActor, batch_size=task_files, batch_format="numpy",
                            fn_constructor_kwargs=actor_args, compute=pool,
                            num_cpus=actor_cpus, max_task_retries=task_retries)
    return ds


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[Any]:
    """Ray Data settings for the run: no progress bars of its own (fxscore shows one), no
    per-dataset log lines, and a failed task's block dropped instead of ending the run (its
    files are resubmitted; see RayScore). Restored afterwards."""
    from ray.data import DataContext

    context = DataContext.get_current()
    wanted = {"enable_progress_bars": False, "print_on_execution_start": False,
              "max_errored_blocks": -1, "enable_auto_log_stats": False}
    saved = {k: getattr(context, k) for k in wanted}
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    for k, v in wanted.items():
        setattr(context, k, v)
    try:
        yield context
    finally:
        for k, v in saved.items():
            setattr(context, k, v)
        logger.setLevel(level)


# ---- the job --------------------------------------------------------------------------------------------

def run_on_ray(model: "Model", root: str | Path, out: str, *, settings: RaySettings | None = None,
               batch_size: int = 32, threshold: float | None = None,
               stats: RayStats | None = None, warn: Callable[[str], None] | None = None,
               score_options: dict | None = None, **run_job_options) -> "Summary":
    """`runner.run_job` with its scoring on Ray: same listing, resume, writer and summary.

    `run_job_options` are run_job's (fmt, overwrite, shard, follow_links, retry_errors,
    summary, progress, on_ignored); its `workers` (hashing threads when resuming) default to
    this machine's CPUs, and its `max_memory`, if given, is each actor's (as settings.max_memory).
    `score_options`: further keywords of `scoring.score_batches` (picklable), the same in every
    actor as in a single-process run with those options.
    """
    import inspect

    from .runner import run_job

    # the DICOM options travel to the actors: run_job's default when none are given
    dicom = run_job_options.get("dicom", inspect.signature(run_job).parameters["dicom"].default)
    score_options = {**(score_options or {}), "dicom": dicom}
    settings = settings or RaySettings()
    if run_job_options.get("max_memory") and settings.max_memory is None:
        settings = replace(settings, max_memory=run_job_options["max_memory"])
    threshold = model.meta.threshold if threshold is None else float(threshold)
    score = RayScore(model, settings, threshold=threshold, batch_size=batch_size, stats=stats,
                     warn=warn, score_options=score_options)
    summary = run_job(model, root, out, batch_size=batch_size, threshold=threshold,
                      warn=warn, score=score, **run_job_options)
    if warn and score.stats.duplicates:
        warn(f"ray: {score.stats.duplicates} duplicate row(s) from retried tasks were dropped")
    return summary


def ray_job(*, ray: str, ray_cpus: int | None = None, ray_actors: tuple[int, int] | None = None,
            ray_batch_size: int | None = None, threads: int | None = None,
            workers: int | None = None) -> Callable[..., "Summary"]:
    """The cli's `run_job` for --ray: same call, scored by `run_on_ray` with these settings.

    `threads` (--threads) are each actor's CPUs, `workers` (--workers) its decode threads.
    """
    import importlib.util

    from .runner import RunError

    if importlib.util.find_spec("ray") is None:  # say so before listing a million files
        raise RunError(RAY_HINT)
    base = RaySettings(address=ray, cpus=ray_cpus, actors=ray_actors, task_files=ray_batch_size,
                       actor_cpus=threads, workers=workers)

    def job(model: "Model", root: str | Path, out: str, *, workers: int | None = None,
            max_memory: int | None = None, **options) -> "Summary":
        settings = replace(base, max_memory=max_memory)
        return run_on_ray(model, root, out, settings=settings, **options)

    return job
