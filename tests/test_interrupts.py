"""Ctrl-C: during work spread over process pools (prepare, seeds, CRF refinement) the main
process stops at once, without one traceback per worker and without hanging; every command then
says what continues the work.

Ctrl-C signals the whole process group. A pool worker that took KeyboardInterrupt while holding
the pool's queue lock left the main process blocked in terminate() (seen with the pseudo-label
CRF pool); the workers ignore SIGINT, the main process handles it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO

SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    sys.path.insert(0, {repo!r})

    def slow(x):
        time.sleep(0.2)
        return x

    if __name__ == "__main__":
        from data.parallel import parallel_map
        from stages.irn.crf_pool import one_thread_worker
        threading.Timer(2.5, lambda: os.killpg(os.getpgrp(), signal.SIGINT)).start()
        try:
            if {pool!r} == "parallel_map":
                for _ in parallel_map(slow, list(range(400)), workers=2, progress=False, start_method="spawn"):
                    pass
            else:  # the CRF pool's workers
                import multiprocessing
                with multiprocessing.get_context("spawn").Pool(2, initializer=one_thread_worker) as pool:
                    for _ in pool.imap_unordered(slow, list(range(400))):
                        pass
        except KeyboardInterrupt:
            print("interrupted")
            sys.exit(130)
""")


@pytest.mark.parametrize("pool", ["parallel_map", "crf_pool"])
def test_ctrl_c_stops_a_pool_at_once_without_worker_tracebacks(tmp_path, pool):
    script = tmp_path / "work.py"
    script.write_text(SCRIPT.format(repo=str(REPO), pool=pool))
    # a session of its own: the script's Ctrl-C reaches its process group, not pytest's
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, start_new_session=True, cwd=tmp_path
    )
    assert done.returncode == 130 and "interrupted" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr


def test_after_ctrl_c_each_command_says_what_continues_the_work(cli, monkeypatch, tmp_path, tiny_synthetic):
    import data.synthetic
    from pipeline.runner import Pipeline

    calls = []

    def interrupted(self, name, **options):
        calls.append(options)
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "run_stage", interrupted)
    result = cli(
        "pseudo-labels",
        "-c",
        "configs/demo.yaml",
        "-o",
        f"data.root={tiny_synthetic}",
        "-o",
        f"run.workdir={tmp_path}",
        "--resume",
    )
    assert result.exit_code == 130 and "the same command with `--resume` continues it" in result.output
    assert calls == [{"force": False, "resume": True}]

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.synthetic, "write_synthetic", stop)
    result = cli("prepare", "synthetic", "--out", str(tmp_path / "d"), "--n", "8", "--size", "32")
    assert result.exit_code == 130 and "rerun the same command: the images already prepared are kept" in result.output
    assert "--resume" not in result.output
