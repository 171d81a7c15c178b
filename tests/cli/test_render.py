"""Progress without a terminal: plain lines with the stage, i/N, elapsed time and estimate, at least every interval
(a fake clock stands in for time; nothing here waits)."""

from __future__ import annotations

from polykv_search.cli.render import PlainProgress, progress_bars


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_writes_a_line_per_stage_start_end_and_interval():
    clock, lines = Clock(), []
    progress = PlainProgress(write=lines.append, interval=30.0, clock=clock)
    progress.update("calibrate", 0, 4, "prefilling")
    clock.now += 10
    progress.update("calibrate", 1, 4, "qa (900 tok)")  # 10 s after the last line: held back
    assert lines == ["calibrate 0/4, elapsed 0s, eta ?: prefilling"]
    clock.now += 20
    progress.update("calibrate", 2, 4, "qa (800 tok)")  # 30 s: due
    assert lines[-1] == "calibrate 2/4, elapsed 30s, eta 30s: qa (800 tok)"
    clock.now += 95
    progress.tick()  # a long step with no update: the heartbeat repeats the last state with the time gone by
    assert lines[-1] == "calibrate 2/4, elapsed 2m05s, eta 2m05s: qa (800 tok)"
    progress.tick()  # nothing new and no interval passed
    assert len(lines) == 3
    clock.now += 1
    progress.update("calibrate", 4, 4, "done")  # the end of a stage always shows
    progress.update("optimize", 0, 0, "128 tokens/layer: dp optimal")  # a step with no count: its own line
    progress.update("guard", 0, 6, "prefilling the calibration samples")  # a new stage always shows
    assert lines[3:] == ["calibrate 4/4, elapsed 2m06s, eta 0s: done", "optimize: 128 tokens/layer: dp optimal",
                         "guard 0/6, elapsed 0s, eta ?: prefilling the calibration samples"]


def test_progress_bars_fall_back_to_plain_lines_off_a_terminal(capsys):
    with progress_bars(plain=True) as progress:
        progress("evaluate", 1, 2, "12 methods per sample")
    err = capsys.readouterr().err
    assert "evaluate 1/2, elapsed 0s, eta " in err and "12 methods per sample" in err
