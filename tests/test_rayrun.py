"""`fxscore run --ray` against a real local Ray cluster: the same rows as a single process, on
sample data (DICOM included) and real X-rays; an actor killed mid-run; the driver SIGKILLed
mid-run and resumed; --shard; 127.0.0.1 only; a million paths in flat memory; a real
two-node cluster (two raylets on this machine), one actor on each node.

The tests marked `ray` need the [ray] extra and share one local cluster (2 CPUs), but for the
two-node one, which starts its own; the others (imports, the actor's settings) run in every
install, Ray or not. The --ray options are tests/test_rayoptions.py's.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from fxscore import proctree
from fxscore.cli import cli
from fxscore.files import Shard
from fxscore.model import load_model
from fxscore.runner import run_job

from conftest import SAMPLE_DATA
from onnx_models import make_model

needs_ray = pytest.mark.ray


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def model(model_path):
    return load_model(model_path, threads=2)


def read_rows(path: Path) -> list[tuple]:
    """The data rows of an output CSV, sorted: a set of rows that can be compared exactly."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "path"
    return sorted(map(tuple, rows[1:]))


def paths_of(path: Path) -> list[str]:
    return [row[0] for row in read_rows(path)]


def single_process(model, root: Path, out: Path, **options) -> list[tuple]:
    run_job(model, root, str(out), overwrite=True, **options)
    return read_rows(out)


# ---- without Ray: imports, the actor's settings -----------------------------------------

def test_import_fxscore_never_imports_ray():
    code = ("import sys, fxscore, fxscore.cli, fxscore.rayrun, fxscore.runner; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_without_ray_the_message_says_how_to_install_it(tmp_path):
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("Ray is installed here")
    result = CliRunner().invoke(cli, ["run", str(SAMPLE_DATA), "--ray", "local", "--out",
                                      str(tmp_path / "x.csv")])
    assert result.exit_code == 1
    assert 'pip install "fxscore[ray]"' in result.output


@pytest.mark.parametrize("node_cpus, expected", [
    ([2], 1), ([3], 1), ([4], 2), ([8], 4), ([64], 4), ([16, 2], 1), ([1], 1)])
def test_default_actor_cpus_leave_room_for_two_actors_per_node(node_cpus, expected):
    from fxscore.rayrun import default_actor_cpus

    assert default_actor_cpus(node_cpus) == expected


def test_actor_threads_are_its_cpus_and_one_inter_op(model_path):
    """What Ray Data constructs in each actor, built here directly: onnxruntime sized to the
    actor's CPUs (Ray's OMP_NUM_THREADS=1 does not reach it), inter-op 1."""
    from fxscore.rayrun import ScoreActor

    model = load_model(model_path)
    actor = ScoreActor(model_path.read_bytes(), model.model_id, str(model_path), 0.5,
                       batch_size=8, threads=3, workers=None, max_memory=None)
    options = actor.model.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert actor.workers == 3
    with pytest.raises(Exception, match="received model"):
        ScoreActor(model_path.read_bytes(), "0" * 12, str(model_path), 0.5, batch_size=8,
                   threads=1, workers=None, max_memory=None)


def test_a_file_a_node_cannot_see_is_an_error_row_that_says_so(model_path, tmp_path):
    import numpy as np

    from fxscore.rayrun import ScoreActor
    import pickle

    model = load_model(model_path)
    good = SAMPLE_DATA / "extras" / "rgba.png"
    gone = tmp_path / "mounted-elsewhere" / "x.png"
    batch = {"i": np.array([0, 1]), "rel": np.array([b"rgba.png", b"x.png"], dtype=object),
             "path": np.array([os.fsencode(good), os.fsencode(gone)], dtype=object)}
    args = (model_path.read_bytes(), model.model_id, str(model_path), 0.5)
    elsewhere = ScoreActor(*args, batch_size=8, threads=1, workers=1, max_memory=None,
                           driver_node="10.255.0.1")
    ok, missing = (pickle.loads(b) for b in elsewhere(batch)["row"])
    assert ok["error"] == "" and ok["probability"] is not None
    from fxscore.scoring import score_items

    (single,) = score_items(model, [("x.png", gone)], threshold=0.5)
    assert missing["error"].startswith(single["error"] + " (on Ray node ")
    assert "every node mounts at the same path" in missing["error"]
    assert missing["sha256"] == "" and missing["probability"] is None
    here = ScoreActor(*args, batch_size=8, threads=1, workers=1, max_memory=None,
                      driver_node=None)  # on the driver's node: the single-process message
    _, same = (pickle.loads(b) for b in here(batch)["row"])
    assert same == single


def test_spill_round_trips_odd_names(tmp_path):
    import numpy as np

    from fxscore.rayrun import Spill, read_slices

    items = [(f"d{i % 3}/\udcff name,{i}.png", tmp_path / f"p{i}") for i in range(1000)]
    spill = Spill(iter(items))
    try:
        for n in (1, 7, 256, 1000, 4096):
            got = []
            for offset, count, first in spill.slices(n):
                b = read_slices({"offset": np.array([offset]), "count": np.array([count]),
                                 "first": np.array([first])}, spill.path)
                got += zip(b["i"].tolist(), map(os.fsdecode, b["rel"]), map(os.fsdecode, b["path"]))
            assert got == [(i, rel, str(p)) for i, (rel, p) in enumerate(items)], n
        assert [i for i, *_ in spill.entries(lambda i: i % 100 == 7)] == list(range(7, 1000, 100))
    finally:
        spill.close()
    assert not Path(spill.path).exists()


def test_spill_sweeps_files_of_dead_drivers(tmp_path):
    """A SIGKILLed driver leaves its spill file (patients' paths): the next driver removes the
    files of drivers that no longer run, and leaves those of running ones and other files."""
    from fxscore.rayrun import Spill

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"fxscore-ray-{gone.pid}-abc.todo"
    alive = tmp_path / f"fxscore-ray-{os.getppid()}-def.todo"
    other = tmp_path / "fxscore-ray-notes.todo"
    for f in (dead, alive, other):
        f.write_bytes(b"a\0/x/a.png\0")
    spill = Spill(iter([("b", tmp_path / "b.png")]), folder=str(tmp_path))
    try:
        assert not dead.exists() and alive.exists() and other.exists()
        assert Path(spill.path).name.startswith(f"fxscore-ray-{os.getpid()}-")
    finally:
        spill.close()


# ---- with a real local Ray cluster -----------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    """One local cluster for the module, started the way `--ray local` starts it."""
    pytest.importorskip("ray")
    from fxscore.rayrun import ray_cluster

    with ray_cluster("local", cpus=2) as ray:
        yield ray


@pytest.fixture(scope="module")
def real_slice(real_data_root, tmp_path_factory) -> Path:
    """About 100 real X-rays of both classes (hard links; never modified)."""
    dest = tmp_path_factory.mktemp("slice")
    for cls in ("fractured", "not fractured"):
        for p in sorted((real_data_root / "test" / cls).iterdir())[:50]:
            target = dest / cls / p.name
            target.parent.mkdir(exist_ok=True)
            os.link(p, target)
    return dest


def ray_run(model, root, out, *, stats=None, **settings):
    from fxscore.rayrun import RaySettings, run_on_ray

    overwrite = settings.pop("overwrite", False)
    return run_on_ray(model, root, str(out), settings=RaySettings(**settings), stats=stats,
                      overwrite=overwrite)


def _listening_addresses(pids: list[int]) -> set[str]:
    """Local addresses of the TCP sockets in LISTEN state that these processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with_target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if with_target.startswith("socket:["):
                    inodes.add(with_target[8:-1])
        except OSError:
            continue
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    found.add(fields[1].split(":")[0])
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


@needs_ray
def test_local_cluster_listens_on_loopback_only_without_usage_stats(ray_local):
    pids = proctree.descendants(os.getpid())
    names = set()
    for pid in pids:
        try:
            names.add(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode())
        except OSError:
            pass
    assert any("raylet" in n for n in names) and any("gcs_server" in n for n in names)
    addresses = _listening_addresses(pids + [os.getpid()])
    assert addresses and addresses <= LOOPBACK, addresses
    raylet = next(p for p in pids if b"raylet" in Path(f"/proc/{p}/cmdline").read_bytes()[:200])
    environ = Path(f"/proc/{raylet}/environ").read_bytes().split(b"\0")
    assert b"RAY_USAGE_STATS_ENABLED=0" in environ
    assert b"RAY_AUTH_MODE=token" in environ  # Ray's token authentication, on
    assert ray_local.util.get_node_ip_address() == "127.0.0.1"


@needs_ray
def test_sample_data_gives_the_rows_of_a_single_process_run(ray_local, model, tmp_path):
    """Every format the scorer reads (DICOM, 16-bit PNG and TIFF, broken files as error rows)."""
    from fxscore.rayrun import RayStats

    expected = single_process(model, SAMPLE_DATA, tmp_path / "single.csv")
    assert any(r[0].endswith(".dcm") and not r[6] for r in expected)  # DICOM scored
    assert any(r[6] for r in expected)  # and error rows
    stats = RayStats()
    summary = ray_run(model, SAMPLE_DATA, tmp_path / "ray.csv", stats=stats, actors=(2, 2),
                      actor_cpus=1)
    assert read_rows(tmp_path / "ray.csv") == expected
    assert summary.scored + summary.failed == len(expected) == stats.files
    assert stats.actors == (2, 2) and stats.duplicates == 0 and stats.lost == 0


@needs_ray
@pytest.mark.realdata
def test_real_xrays_give_the_rows_of_a_single_process_run(ray_local, real_slice, tmp_path):
    from fxscore.rayrun import RayStats

    model = load_model(threads=2)  # the packaged default model
    expected = single_process(model, real_slice, tmp_path / "single.csv")
    assert len(expected) == 100 and not any(r[6] for r in expected)
    stats = RayStats()
    ray_run(model, real_slice, tmp_path / "ray.csv", stats=stats)  # the default layout
    assert (stats.actors, stats.actor_cpus) == ((2, 2), 1)  # 2 CPUs: two actors of one each
    assert read_rows(tmp_path / "ray.csv") == expected


def _actor_pids() -> list[int]:
    found = []
    for pid in proctree.descendants(os.getpid()):
        try:
            if b"ScoreActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def _data_rows(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


@needs_ray
@pytest.mark.realdata
def test_an_actor_killed_mid_run_loses_and_repeats_no_row(ray_local, real_slice, model,
                                                          tmp_path):
    from fxscore.rayrun import RayStats

    expected = single_process(model, real_slice, tmp_path / "single.csv")
    out, stats, failure = tmp_path / "ray.csv", RayStats(), []

    def job():
        try:
            ray_run(model, real_slice, out, stats=stats, actors=(2, 2), actor_cpus=1,
                    task_files=4)
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            failure.append(e)

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 150
    while _data_rows(out) < 8 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    victims = _actor_pids()
    written = _data_rows(out)
    assert victims and written < len(expected), "the run must still be going"
    os.kill(victims[0], signal.SIGKILL)
    thread.join(timeout=240)
    assert not thread.is_alive() and not failure, failure
    rows = read_rows(out)
    assert [r[0] for r in rows] == sorted({r[0] for r in rows})  # no path twice
    assert rows == expected  # none lost
    assert victims[0] not in _actor_pids()


@needs_ray
@pytest.mark.realdata
def test_driver_killed_mid_run_resumes_like_a_single_process_run(ray_local, real_slice, model,
                                                                 model_path, tmp_path):
    """SIGKILL the driver of `fxscore run --ray auto` (joined to the test's cluster), rerun."""
    expected = single_process(model, real_slice, tmp_path / "single.csv")
    out = tmp_path / "ray.csv"
    cmd = [sys.executable, "-m", "fxscore.cli", "run", str(real_slice), "-m", str(model_path),
           "--out", str(out), "--ray", "auto", "--threads", "1", "--ray-batch-size", "4", "-q"]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 150
        while _data_rows(out) < 12 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    partial = paths_of(out)
    assert 12 <= len(partial) < len(expected)
    assert len(set(partial)) == len(partial)
    import tempfile
    left = list(Path(tempfile.gettempdir()).glob(f"fxscore-ray-{proc.pid}-*.todo"))
    assert left, "the killed driver's spill file (its list of paths) should still be there"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert read_rows(out) == expected
    assert not any(f.exists() for f in left), "the next driver removes a dead driver's spill"
    assert out.read_text().count("path,probability") == 1


@needs_ray
def test_shards_with_ray_cover_every_file_once(ray_local, model, model_path, tmp_path):
    """Shard 1/2 through the command line with its own --ray local cluster, 2/2 through the
    library on the shared one: each equals the single-process shard, together the full run."""
    expected = single_process(model, SAMPLE_DATA, tmp_path / "single.csv")
    first = subprocess.run(
        [sys.executable, "-m", "fxscore.cli", "run", str(SAMPLE_DATA), "-m", str(model_path),
         "--out", str(tmp_path / "s1.csv"), "--ray", "local", "--ray-cpus", "2",
         "--shard", "1/2", "-q"], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, RAY_ADDRESS=""))
    broken = any(r[6] for r in expected if r[0] in Shard(1, 2))  # sample_data's broken files
    assert first.returncode == (3 if broken else 0), first.stderr
    from fxscore.rayrun import run_on_ray

    run_on_ray(model, SAMPLE_DATA, str(tmp_path / "s2.csv"), shard=Shard(2, 2))
    one, two = read_rows(tmp_path / "s1.csv"), read_rows(tmp_path / "s2.csv")
    assert one == [r for r in expected if r[0] in Shard(1, 2)]
    assert two == [r for r in expected if r[0] in Shard(2, 2)]
    assert sorted(one + two) == expected


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@needs_ray
def test_a_million_paths_are_fed_in_flat_driver_memory(ray_local, tmp_path):
    """The driver's feeding code on 1,000,000 generated paths (no images): the spill file, its
    slices, and the Ray Data dataset over them. Its memory must not grow with the paths."""
    from fxscore.rayrun import Spill, _dataset

    n, root = 1_000_000, tmp_path / "archive"

    def paths(count):
        for i in range(count):
            rel = f"patient{i // 1000:05d}/study1/image{i:07d}.dcm"
            yield rel, f"{root}/{rel}"

    peak = [0]

    def sampled():
        for k, item in enumerate(paths(n)):
            if k % 50_000 == 0:
                peak[0] = max(peak[0], _rss())
            yield item

    before = _rss()
    spill = Spill(sampled())
    try:
        ds = _dataset(ray_local, spill, ray_local.get_runtime_context().get_node_id(),
                      actor_args={}, task_files=256, actors=(1, 1), actor_cpus=1,
                      task_retries=3)
        assert spill.count == n and ds is not None
        peak[0] = max(peak[0], _rss())
        grown = peak[0] - before
    finally:
        spill.close()
    # What a list of them would take, as the runner yields them (str, Path): a tenth, x 10.
    held = _rss()
    tenth = [(rel, Path(path)) for rel, path in paths(n // 10)]
    listed = 10 * (_rss() - held)
    del tenth
    assert grown < 48 << 20, f"feeding 1M paths grew the driver by {grown >> 20} MiB"
    assert grown < listed / 4, (grown, listed)


# ---- a real two-node cluster -----------------------------------------------------------------------

# Ray's own multi-node-on-one-host utility, in a process of its own: its shutdown resets this
# process's Ray state (the internal KV client of the module's cluster) and token mode is read
# per process. It prints the address and node ids, then answers each line on stdin with the
# GCS actor table (dead actors included: the pool is gone when the job ends); EOF shuts it down.
TWO_NODES = r"""
import json, sys
from ray.cluster_utils import Cluster

node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
cluster = Cluster(initialize_head=True, head_node_args=node)
try:
    cluster.add_node(**node)
    cluster.wait_for_nodes(timeout=300)
    print(json.dumps({"address": cluster.address,
                      "nodes": [n.node_id for n in cluster.list_all_nodes()]}), flush=True)
    for _ in sys.stdin:
        print(json.dumps([{"class": a["ActorClassName"], "state": a["State"],
                           "node": a["Address"]["NodeID"]}
                          for a in cluster.global_state.actor_table(None).values()]), flush=True)
finally:
    cluster.shutdown()
"""


def _program(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


class TwoNodes:
    """The helper process running the cluster: its address, node ids and environment."""

    def __init__(self, log: Path) -> None:
        import secrets

        from ray._private import ray_constants

        self.log, self.seen = log, {}
        # This test's own token (not ~/.ray/auth_token), usage statistics off, and Ray's
        # single-machine switch (see rayrun._loopback_only): every server on 127.0.0.1.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                         "RAY_AUTH_TOKEN": secrets.token_hex(32),
                         ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"})
        with open(log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", TWO_NODES], env=self.env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, start_new_session=True)
        self.pid = self.proc.pid  # and the id of its session, which every Ray process keeps
        self.address, self.nodes = "", []

    def wait_up(self) -> None:
        info = self._reply()
        self.address, self.nodes = info["address"], info["nodes"]

    def _reply(self):
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)  # a guard against hangs
        line = self.proc.stdout.readline() if ready else ""
        assert line, f"the two-node cluster did not answer:\n{self.log.read_text()[-4000:]}"
        return json.loads(line)

    def actors(self) -> list[dict]:
        self.proc.stdin.write("actors\n")
        self.proc.stdin.flush()
        return self._reply()

    def processes(self) -> list[int]:
        return [self.pid, *proctree.descendants(self.pid)]

    def in_session(self) -> list[int]:
        return [pid for pid, s in proctree.all_stats().items()
                if int(s[proctree.SESSION]) == self.pid and s[proctree.STATE] not in "ZX"]

    def shut_down(self) -> None:
        self.seen = {p: s[proctree.START] for p in self.processes() + self.in_session()
                     if (s := proctree.stat(p))}
        self.proc.stdin.close()  # EOF: Cluster.shutdown() stops both nodes
        try:
            self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:  # only this test's processes, by id
            for pid in self.in_session():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait()
        finally:
            self.proc.stdout.close()

    def left(self) -> list[str]:
        """The cluster's processes still running: those seen at shutdown, and its session."""
        alive = {p for p, start in self.seen.items() if (s := proctree.stat(p))
                 and s[proctree.START] == start and s[proctree.STATE] not in "ZX"}
        return [f"{p} {_program(p)}" for p in sorted(alive | set(self.in_session()))]


@contextlib.contextmanager
def two_node_cluster(log: Path) -> Iterator[TwoNodes]:
    cluster = TwoNodes(log)
    try:
        cluster.wait_up()
        yield cluster
    finally:
        cluster.shut_down()


@needs_ray
def test_two_node_cluster_scores_on_both_nodes_like_a_single_process(model, model_path,
                                                                     tmp_path):
    """`fxscore run --ray ADDRESS` on two nodes (Ray's cluster_utils.Cluster: two raylets and
    node ids on 127.0.0.1, 1 CPU each), 2 actors of 1 CPU: one actor on each node, the rows of
    a single process, and no process of the cluster left afterwards."""
    pytest.importorskip("ray")
    expected = single_process(model, SAMPLE_DATA, tmp_path / "single.csv")
    out = tmp_path / "ray.csv"
    with two_node_cluster(tmp_path / "cluster.log") as cluster:
        pids = cluster.processes()
        raylets = [p for p in pids if _program(p).endswith("/raylet")]
        assert len(raylets) == 2 and len(set(cluster.nodes)) == 2, (raylets, cluster.nodes)
        addresses = _listening_addresses(pids)
        assert addresses and addresses <= LOOPBACK, addresses
        for raylet in raylets:
            assert b"RAY_USAGE_STATS_ENABLED=0" in Path(f"/proc/{raylet}/environ").read_bytes()
        run = subprocess.run(
            [sys.executable, "-m", "fxscore.cli", "run", str(SAMPLE_DATA), "-m", str(model_path),
             "--out", str(out), "--ray", cluster.address, "--ray-actors", "2", "--threads", "1",
             "--ray-batch-size", "4", "-q"],
            env=cluster.env, capture_output=True, text=True, timeout=600)
        actors = cluster.actors()
    assert run.returncode == (3 if any(r[6] for r in expected) else 0), run.stderr[-4000:]
    assert read_rows(out) == expected
    # The scoring pool, from the GCS actor table (its actors are dead by now; each keeps the
    # node it ran on): two actors, one on each node, as 1 CPU per node and per actor forces.
    pool = [a for a in actors if "ScoreActor" in a["class"]]
    assert len(pool) == 2 and {a["node"] for a in pool} == set(cluster.nodes), actors
    assert not cluster.left(), cluster.left()
