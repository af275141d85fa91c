"""What a user's terminal shows: kdcache's own lines (stages, one progress bar per stage, warnings
that need action, the report, errors); Ray's and the libraries' internal chatter goes to a log file
in the run folder instead.

Three sources of chatter, three routes:
* Ray forwards every worker's and actor's stdout/stderr to the driver (`log_to_driver`), prefixed
  `(ActorName pid=N)`: Ray Train's controller and placement-group cleaner alone print about a line
  a second. `RayOutputRouter` replaces Ray's printer on the driver: every forwarded line goes to the
  log file, and only lines a worker marked as kdcache's own reach the terminal.
* A Ray Train worker's progress bar cannot be drawn on the driver's terminal from the worker, so
  `progress_bar` in a worker sends its state as marked lines and the driver draws the bar.
* Python logging and warnings of the libraries (transformers, datasets, Ray's driver-side loggers)
  go to the same file; transformers' and datasets' own progress bars are switched off.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from kdcache.storage.fs import is_url

# A worker line that starts with this is kdcache's own: the driver shows it (without Ray's prefix).
MARK = "[kdcache] "
PROGRESS_MARK = "[kdcache:progress] "
# Set by kdcache's driver in its Ray workers' environment (`worker_env`): their output is relayed.
REMOTE_ENV = "KDCACHE_REMOTE_CONSOLE"
LOG_NAME = "kdcache.log"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Processes that run kdcache's code: an error they print is shown as well as logged. Ray's own actors
# (TrainController, PlacementGroupCleaner, ...) print tracebacks they recover from: those are only logged.
OUR_ACTORS = ("RayTrainWorker", "TeacherActor")
# What errors look like in forwarded output.
_ERROR_LINE = re.compile(r"Traceback \(most recent call last\)|^\s*(\w+\.)*\w*(Error|Exception)\b[:(]|\bCRITICAL\b")


def worker_env() -> dict[str, str]:
    """Environment for Ray workers whose driver draws their bars (`RayOutputRouter`); elsewhere (a
    user's own TorchTrainer or Ray Tune) a worker's bar stays a plain tqdm bar."""
    return {REMOTE_ENV: "1"}


def _remote() -> bool:
    return os.environ.get(REMOTE_ENV) == "1"


def say(text: str) -> None:
    """A kdcache line from any process: printed here, or marked for the driver when forwarded by Ray."""
    print(f"{MARK}{text}" if _remote() else text, flush=True)


class _RemoteBar:
    """The parts of tqdm's interface the trainer uses; state goes to the driver as marked lines,
    at most one per `mininterval` seconds, and always the last one."""

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", unit: str = "it",
                 mininterval: float = 1.0, **_: Any):
        self.total, self.n, self.desc, self.unit, self.mininterval = total, initial, desc, unit, mininterval
        self.postfix = ""
        self._last = 0.0
        self._send(force=True)

    def _send(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.mininterval:
            self._last = now
            state = {"desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit, "postfix": self.postfix}
            print(PROGRESS_MARK + json.dumps(state), flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._send(force=self.total is not None and self.n >= self.total)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def write(self, s: str) -> None:
        say(s)

    def close(self) -> None:
        self._send(force=True)


def progress_bar(**kwargs: Any):
    """A tqdm bar here, or, inside a Ray worker, one the driver draws (`RayOutputRouter`)."""
    if _remote():
        return _RemoteBar(**kwargs)
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)


def _write(f, text: str | None) -> None:
    """The log is best effort: a full disk must surface as the pass's own error, not as a logging one."""
    try:
        f.write(text) if text is not None else f.flush()
    except (OSError, ValueError):
        pass


class _LogFileHandler(logging.StreamHandler):
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass  # see `_write`: no "--- Logging error ---" traceback on the user's terminal


class RayOutputRouter:
    """Ray's forwarded worker output, sorted on the driver: everything to the log file, marked lines
    and errors to the terminal, marked progress drawn as one bar per stage."""

    def __init__(self, log_file, terminal: Callable[[str], None] | None = None):
        self._file = log_file
        self._terminal = terminal or (lambda s: print(s, file=sys.stderr, flush=True))
        self._bars: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, data: dict[str, Any]) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who} pid={data.get('pid')}) " if data.get("pid") not in ("raylet", "autoscaler") else ""
        with self._lock:
            for raw in data.get("lines", []):
                line = _ANSI.sub("", raw)
                if line.startswith(PROGRESS_MARK):
                    self._progress(line[len(PROGRESS_MARK):])
                    continue
                _write(self._file, prefix + line + "\n")
                if line.startswith(MARK):
                    self._terminal(line[len(MARK):])
                elif who in OUR_ACTORS and _ERROR_LINE.search(line):
                    self._terminal(f"{prefix}{line}")
            _write(self._file, None)

    def _progress(self, payload: str) -> None:
        try:
            state = json.loads(payload)
        except ValueError:
            return
        from tqdm.auto import tqdm

        key = state.get("desc", "")
        bar = self._bars.get(key)
        if bar is None or (state.get("n", 0) < bar.n):  # a restarted worker group starts a new bar
            if bar is not None:
                bar.close()
            bar = self._bars[key] = tqdm(total=state.get("total"), initial=state.get("n", 0), desc=key,
                                         unit=state.get("unit", "it"), dynamic_ncols=True)
        bar.n = state.get("n", 0)
        if state.get("postfix"):
            bar.set_postfix_str(state["postfix"], refresh=False)
        bar.refresh()
        if bar.total is not None and bar.n >= bar.total:
            bar.close()
            del self._bars[key]

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()


def _on_terminal(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def _quiet_libraries(handler: logging.Handler) -> list[tuple[logging.Logger, list, int, bool]]:
    """Library loggers (and Python warnings) into the log file; returns what to restore. The HF
    libraries go first: they attach their own handler the first time their logging is touched."""
    with contextlib.suppress(ImportError):
        import ray  # noqa: F401  (importing it installs its driver-side handler, taken off below)
    try:  # their own progress bars ("Loading weights", "Writing model shards") are not our stages
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
    except ImportError:
        pass
    try:
        from datasets.utils import logging as ds_logging

        ds_logging.disable_progress_bar()
    except ImportError:
        pass
    saved = []
    for name in ("", "ray", "ray.train", "ray.data", "ray.tune", "transformers", "datasets", "huggingface_hub",
                 "py.warnings"):
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.level, lg.propagate))
        if name == "":  # handlers that print on the terminal make way for the file; others (pytest's) stay
            lg.handlers = [h for h in lg.handlers if not _on_terminal(h)] + [handler]
            lg.setLevel(logging.INFO)
        else:
            lg.handlers = []
            lg.propagate = True
    ours = logging.getLogger("kdcache")
    saved.append((ours, ours.handlers[:], ours.level, ours.propagate))
    if not ours.handlers:  # a library caller: kdcache's warnings still need the user's eyes
        terminal = logging.StreamHandler(sys.stderr)
        terminal.setLevel(logging.WARNING)
        terminal.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        ours.addHandler(terminal)
    logging.captureWarnings(True)
    return saved


@contextlib.contextmanager
def run_console(run_dir: str | Path | None, say_where: Callable[[str], None] | None = None) -> Iterator[Path | None]:
    """Inside: the terminal shows kdcache's lines only; everything else goes to `<run_dir>/kdcache.log`
    (a URL or no run folder: a kept temporary folder, whose path is printed). Yields the log's path.

    One per process, entered by the command or demo that owns the terminal: a nested call (a demo's
    stages, `train` inside a demo) is a no-op that yields the outer log."""
    if getattr(run_console, "_active", None):
        yield run_console._active
        return
    folder = Path(run_dir) if run_dir and not is_url(str(run_dir)) else None
    if folder is None:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="kdcache-logs-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOG_NAME
    with contextlib.ExitStack() as undo:
        log_file = open(path, "a", encoding="utf-8")
        undo.callback(_close_quietly, log_file)
        _write(log_file, f"--- kdcache {' '.join(sys.argv[1:]) or '(library call)'} at "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handler = _LogFileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        undo.callback(_restore_loggers, _quiet_libraries(handler), logging._warnings_showwarning is not None)
        router = RayOutputRouter(log_file)
        undo.callback(router.close)
        undo.callback(_route_ray_output(router))
        (say_where or (lambda s: print(s, flush=True)))(f"library and Ray messages: {path}")
        run_console._active = path
        undo.callback(setattr, run_console, "_active", None)
        yield path


@contextlib.contextmanager
def prints_to_log(logger: str) -> Iterator[None]:
    """Inside: the driver's own `print`s go to `logger` (the log file under `run_console`), not the
    terminal. For library code that prints instead of logging (Ray Tune's start-of-experiment
    table and "View detailed results" lines do, whatever its verbosity)."""
    lg = logging.getLogger(logger)

    class _Lines:
        def write(self, text: str) -> int:
            for line in text.splitlines():
                if line.strip():
                    lg.info(line)
            return len(text)

        def flush(self) -> None:
            pass

    with contextlib.redirect_stdout(_Lines()):
        yield


def _close_quietly(f) -> None:
    with contextlib.suppress(OSError):
        f.close()


def _restore_loggers(saved: list, capturing_warnings: bool) -> None:
    logging.captureWarnings(capturing_warnings)
    for lg, handlers, level, propagate in saved:
        lg.handlers, lg.level, lg.propagate = handlers, level, propagate


def _route_ray_output(router: RayOutputRouter) -> Callable[[], None]:
    """Put `router` in place of Ray's printer of forwarded output, now and for any `ray.init` to come
    while it is active; returns the undo. Ray's dispatcher is internal: if its shape ever changes,
    Ray's own printing stays (a noisier screen, nothing lost)."""
    try:
        from ray._private import ray_logging, worker

        dispatcher = ray_logging.global_worker_stdstream_dispatcher
        original_add = dispatcher.add_handler
        lock = dispatcher._lock
        with lock:
            dispatcher.handlers = [(n, router if n == "ray_print_logs" else h) for n, h in dispatcher.handlers]
    except (ImportError, AttributeError):
        return lambda: None

    def add_handler(name: str, handler: Callable) -> None:
        original_add(name, router if name == "ray_print_logs" else handler)

    dispatcher.add_handler = add_handler

    def undo() -> None:
        del dispatcher.add_handler  # the class's method again
        with lock:
            dispatcher.handlers = [
                (n, _ray_printer(worker) if h is router else h) for n, h in dispatcher.handlers]

    return undo


def _ray_printer(worker_module):
    """Ray's own printer, as `ray.init` installs it."""
    import functools

    return functools.partial(worker_module.print_to_stdstream,
                             ignore_prefix=worker_module._should_ignore_worker_log_prefix(worker_module.global_worker))
