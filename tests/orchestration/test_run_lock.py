"""One driver per run for `updetr run` and `updetr sweep`, and the run lock itself (real processes, real files):
a second driver is refused before Ray starts, in one line naming the holder."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from updetr.run_lock import Lease, RunInUse, hold_run

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of a folder, as a first driver does."""
    procs = []

    def start(folder: Path, label: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", "import time; from updetr.run_lock import hold_run\n"
                              f"with hold_run({str(folder)!r}, {label!r}):\n"
                              "    print('held', flush=True); time.sleep(600)"],
                             cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=ENV)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=30)


def updetr(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "updetr", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=ENV)


def test_second_run_driver_is_refused_before_ray_starts(tmp_path, holder):
    first = holder(tmp_path / "runs" / "ray" / "conc", "run 'conc'")
    t0 = time.monotonic()
    r = updetr(tmp_path, "run", str(REPO / "experiments" / "smoke.yaml"), "ray.run_name=conc",
               f"runtime.output_dir={tmp_path / 'runs'}", f"tracking.uri={tmp_path / 'mlflow.db'}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.fullmatch(rf"updetr: error: run 'conc' is in use by pid {first.pid} on host \S+ since \d\d:\d\d; "
                        r"wait for it, or set ray\.run_name=\.\.\. for a separate run", r.stderr.strip()), r.stderr
    assert not (tmp_path / "mlflow.db").exists() and r.stdout == ""      # nothing started, nothing written
    assert time.monotonic() - t0 < 120                                     # refused before Ray (~30 s) would start


def test_second_sweep_driver_is_refused(tmp_path, holder):
    first = holder(tmp_path / "runs" / "sweeps" / "conc", "sweep 'conc'")
    r = updetr(tmp_path, "sweep", str(REPO / "experiments" / "sweeps" / "demo_updetr-vs-random-init.yaml"),
               "--name", "conc", f"runtime.output_dir={tmp_path / 'runs'}", f"tracking.uri={tmp_path / 'mlflow.db'}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.fullmatch(rf"updetr: error: sweep 'conc' is in use by pid {first.pid} on host \S+ since \d\d:\d\d; "
                        r"wait for it, or use --name NAME for a separate sweep", r.stderr.strip()), r.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_lock_is_reentrant_in_one_process_and_free_after_release(tmp_path):
    with hold_run(tmp_path, "run 'x'"):
        with hold_run(tmp_path, "run 'x'"):            # a chain's stage inside the chain's own driver
            pass
        r = subprocess.run([sys.executable, "-c", "from updetr.run_lock import hold_run\n"
                            f"with hold_run({str(tmp_path)!r}, \"run 'x'\"): pass"],
                           capture_output=True, text=True, env=ENV, timeout=60)
        assert r.returncode == 1 and "RunInUse: run 'x' is in use by pid" in r.stderr
    assert (tmp_path / ".updetr-run.lock").read_text() == ""  # released cleanly: no takeover note next time
    r = subprocess.run([sys.executable, "-c", "from updetr.run_lock import hold_run\n"
                        f"with hold_run({str(tmp_path)!r}, \"run 'x'\"): print('ok')"],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok" and r.stderr == "", r.stderr


def test_object_store_lease_refuses_a_live_holder_and_takes_over_an_expired_one(tmp_path, capsys):
    fs = pafs.LocalFileSystem()
    path = str(tmp_path / ".updetr-run.lease.json")
    first = Lease(fs, path, "run 'x'", "use name=... for a separate run", ttl_s=1.5)
    first.acquire(out=sys.stderr, settle_s=0.05)
    second = Lease(fs, path, "run 'x'", "use name=... for a separate run", ttl_s=1.5)
    second.holder.pid += 1                              # another driver
    time.sleep(1.0)                                     # past the first ttl: renewals keep the lease alive
    with pytest.raises(RunInUse, match=rf"run 'x' is in use by pid {os.getpid()} on host"):
        second.acquire(out=sys.stderr, settle_s=0.05)
    first._stop.set()                                    # the holder dies: no more renewals
    first._thread.join()
    time.sleep(1.7)
    second.acquire(out=sys.stderr, settle_s=0.05)
    err = capsys.readouterr().err
    assert f"the lease of pid {os.getpid()} on host" in err and "expired at" in err and "taking it over" in err, err
    second.release()
    assert not Path(path).exists()
