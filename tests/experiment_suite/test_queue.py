"""results/run_queue.sh: the job list and the status read from its log (no job runs here)."""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _queue(tmp_path, **env):
    (tmp_path / "results").mkdir(exist_ok=True)
    script = tmp_path / "results" / "run_queue.sh"
    shutil.copyfile(ROOT / "results" / "run_queue.sh", script)
    out = subprocess.run(["bash", str(script)], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.splitlines()


def test_status_marks_the_jobs_whose_exact_command_finished_and_names_the_restart_point(tmp_path):
    jobs = [line.split(" ", 1) for line in _queue(tmp_path, QUEUE_LIST="1")]
    assert [int(n) for n, _ in jobs] == list(range(1, len(jobs) + 1)) and len(jobs) > 50
    log = tmp_path / "results" / "queue_log.tsv"
    rows = ["job\tstatus\twall_s\tload_before\tload_after\tended\tcommand",
            f"1\t0\t10\t1.0\t1.0\tT\tpython -m experiments {jobs[0][1]}",
            f"2\t1\t10\t1.0\t1.0\tT\tpython -m experiments {jobs[1][1]}",        # failed: still to do
            f"3\t0\t10\t1.0\t1.0\tT\tpython -m experiments {jobs[2][1]} --x"]    # another command
    log.write_text("\n".join(rows) + "\n")
    status = _queue(tmp_path, QUEUE_STATUS="1")
    assert status[0] == f"1 done {jobs[0][1]}"
    assert status[1] == f"2 todo {jobs[1][1]}" and status[2] == f"3 todo {jobs[2][1]}"
    assert status[-1] == "first job to run: 2"
