"""data.writer.BackgroundWriter: every queued file written, one image's failure listed, a disk
error raised in the caller, and what was handed over written also when the caller fails."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from data.writer import BackgroundWriter


def write_text(path: Path, text: str) -> None:
    path.write_text(text)


def test_every_job_is_written_before_close_returns(tmp_path):
    with BackgroundWriter(threads=2, queue_size=2) as writer:
        for index in range(20):
            writer.submit(str(index), write_text, tmp_path / f"{index}.txt", str(index))
        assert writer.close() == []
    assert sorted(int(p.stem) for p in tmp_path.glob("*.txt")) == list(range(20))
    assert all((tmp_path / f"{index}.txt").read_text() == str(index) for index in range(20))


def test_a_failing_job_is_listed_and_the_others_are_written(tmp_path):
    def broken(path):
        raise ValueError("cannot encode")

    writer = BackgroundWriter(threads=1)
    writer.submit("a", write_text, tmp_path / "a.txt", "a")
    writer.submit("b", broken, tmp_path / "b.txt")
    writer.submit("c", write_text, tmp_path / "c.txt", "c")
    assert writer.close() == ["b: ValueError: cannot encode"]
    assert {p.name for p in tmp_path.iterdir()} == {"a.txt", "c.txt"}


def test_a_disk_error_is_raised_in_the_caller(tmp_path):
    writer = BackgroundWriter(threads=1)
    writer.submit("x", write_text, tmp_path / "missing" / "x.txt", "x")  # no such folder: OSError
    with pytest.raises(OSError):
        for index in range(100):  # the next submit (or close) raises it
            writer.submit(str(index), write_text, tmp_path / f"{index}.txt", "y")
            time.sleep(0.01)
        writer.close()
    writer.close()  # raised once; closing again is quiet


def test_a_full_queue_holds_the_caller_back(tmp_path):
    release = threading.Event()
    writer = BackgroundWriter(threads=1, queue_size=1)
    writer.submit("slow", lambda: release.wait(5))
    writer.submit("queued", write_text, tmp_path / "q.txt", "q")
    blocked = threading.Thread(target=writer.submit, args=("third", write_text, tmp_path / "t.txt", "t"))
    blocked.start()
    time.sleep(0.2)
    assert blocked.is_alive()  # bounded memory: waits for the writer
    release.set()
    blocked.join(5)
    assert writer.close() == [] and {p.name for p in tmp_path.iterdir()} == {"q.txt", "t.txt"}


def test_leaving_on_an_exception_writes_what_was_handed_over(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with BackgroundWriter(threads=1) as writer:
            writer.submit("a", write_text, tmp_path / "a.txt", "a")
            raise KeyboardInterrupt
    assert (tmp_path / "a.txt").read_text() == "a"
