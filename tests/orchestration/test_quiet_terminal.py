"""The terminal of a real `updetr sweep` on local Ray holds updetr's lines only: no `(raylet)` or
`(RayTrainWorker pid=...)` prefixes, no Tune box or "View detailed results" hint, no dedup notes, no ANSI
escapes (output is not a TTY here); Ray's own output is in the log file the run names, and
`UPDETR_RAY_LOGS=all` is what brings it back (test_console.py covers the filter line by line). ~2-4 min
on 2 idle cores."""
from __future__ import annotations

import re

import pytest
import yaml

from .conftest import REPO, cli_env, reap, short_tmpdir, updetr

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# both trials at once on 2 CPUs (0.5 + 0.25 + 0.01 each)
TINY = ["ray.num_workers=1", "ray.cpus_per_worker=0.5", "data.preprocess_cpus=0.25", "schedule.max_steps=2",
        "schedule.epochs=1",
        "data.synthetic_images=4", "schedule.log_every=1", "schedule.checkpoint_every=2"]
RAY_FORMATTING = re.compile(r"\((raylet|autoscaler|\w+ pid=\d+|pid=\d+)[,)]|repeated \d+x across cluster|"
                            r"[\u2500-\u257f]|View detailed results|tensorboard --logdir|\x1b\[|"
                            r"^\S+ (WARNING|INFO|ERROR) \w+\.py:\d+ -- ")


@pytest.mark.timeout(1500)
def test_a_sweep_prints_only_updetr_lines_and_names_the_ray_log(tmp_path):
    sweep_file = tmp_path / "q.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "quiet", "experiment": str(REPO / "experiments" / "smoke.yaml"),
                                          "grid": {"seed": [1, 2]}}, sort_keys=False))
    ray_tmp = short_tmpdir("uqt")
    try:
        r = updetr("sweep", str(sweep_file), *TINY, f"runtime.output_dir={tmp_path}/runs",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path, env=cli_env(ray_tmp), timeout=1450)
    finally:
        reap(ray_tmp)
    (tmp_path / "terminal.txt").write_text(r.stdout + r.stderr)      # to read after a failure
    lines = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 0, "\n".join(lines[-60:])
    foreign = [ln for ln in lines if RAY_FORMATTING.search(ln)]
    assert not foreign, "\n".join(foreign[:20])
    assert "sweep quiet: 2 trials in" in r.stdout
    for seed in (1, 2):
        assert re.search(rf"^\[quiet-seed-{seed}-?\S*\] step 2/2 ", r.stdout, re.M), r.stdout[-3000:]
    # one line names the log file, and that file holds what Ray printed (worker prefixes included)
    named = [ln for ln in lines if ln.startswith("Ray's own output")]
    assert len(named) == 1, named
    log = tmp_path / "runs" / "logs"
    files = list(log.glob("sweep-quiet-*-ray.log"))
    assert len(files) == 1 and str(files[0]) in named[0]
    assert re.search(r"\(\w+ pid=\d+\) ", files[0].read_text())
