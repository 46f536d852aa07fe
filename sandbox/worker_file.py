"""Mounting a real RunPod worker file in the sandbox: a file written for `runpod.serverless.start` runs
unchanged.

A worker file as RunPod's docs show it calls `runpod.serverless.start({"handler": fn, ...})` at module
level. Imported as is, that call starts a worker: it rewrites `sys.argv`, installs a SIGINT handler,
and either runs `asyncio.run` (an error inside a running loop) or exits the process. `load_worker`
imports the file with `runpod.serverless.start` replaced by a function that only records its config
(the replacement holds a lock, so two imports never see each other's), then puts back whatever the
import changed: `sys.argv`, the SIGINT/SIGTERM handlers, `sys.excepthook`, `sys.path`. A `SystemExit`
raised by the file is caught and reported as a `WorkerFileError`, never passed on.

What the recorded config says is honoured by the runtime (`runpod_worker`): `handler`,
`return_aggregate_stream` (a generator job's output is its parts only when True, else `[]`),
`concurrency_modifier` (called with the current concurrency, it says how many jobs one worker takes
at once) and `refresh_worker` (a fresh import of the file after each job, as RunPod starts a fresh
worker). A file whose `start` sits under `if __name__ == "__main__":` is imported under another name,
so its call is read from the source instead; failing that, its function named `handler` is used.

The folder of the file is on `sys.path` while it is imported, so a sibling module it imports at module
level is found; the sibling modules loaded that way are taken out of `sys.modules` afterwards (the
worker keeps its references), so two worker folders may each have their own `utils.py`.

`runpod.serverless.progress_update(job, p)` reaches the sandbox: the job a handler receives is a
`SandboxJob` (a dict), and the SDK's progress sender is wrapped once per process to hand the update of
a sandbox job to the runtime instead of posting it to RunPod; any other job goes the SDK's way.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import itertools
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from podsettle.support.logs import get_logger

__all__ = [
    "SandboxJob",
    "WorkerFileError",
    "WorkerSpec",
    "install_progress_hook",
    "is_worker_path",
    "load_worker",
    "locate_worker_file",
]

log = get_logger(__name__)

Handler = Callable[[dict[str, Any]], Any]
ConcurrencyModifier = Callable[[int], int]

# The file names RunPod's worker templates use, tried in this order when a folder is mounted.
WORKER_FILE_NAMES = ("handler.py", "rp_handler.py", "main.py", "src/handler.py", "src/rp_handler.py")
START_KEYS = ("handler", "return_aggregate_stream", "concurrency_modifier", "refresh_worker")

_IMPORT_LOCK = threading.RLock()
_HOOK_LOCK = threading.Lock()
_NAMES = itertools.count(1)


class WorkerFileError(ValueError):
    """A worker file could not be mounted (not found, failed or exited while imported, no handler)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker runs: its handler and `start` options (from a file, or given directly)."""

    handler: Handler
    return_aggregate_stream: bool = False
    concurrency_modifier: ConcurrencyModifier | None = None
    refresh_worker: bool = False
    path: Path | None = None
    module_name: str | None = None

    @property
    def from_file(self) -> bool:
        return self.path is not None


class SandboxJob(dict[str, Any]):
    """The job dict a sandbox handler receives (`{"id", "input", ...}`); it knows where its progress
    updates go."""

    __slots__ = ("_on_progress",)

    def __init__(self, fields: dict[str, Any], on_progress: Callable[[Any], None]) -> None:
        super().__init__(fields)
        self._on_progress = on_progress

    def report_progress(self, progress: Any) -> None:
        self._on_progress(progress)


def is_worker_path(spec: object) -> bool:
    """True when a handler spec names a file or folder (not `package.module:function`)."""
    if not isinstance(spec, str | Path):
        return False
    text = str(spec)
    return text.endswith(".py") or Path(text).is_dir()


def locate_worker_file(spec: str | Path) -> Path:
    """The worker file a path names: the file itself, or in a folder the first of WORKER_FILE_NAMES."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in WORKER_FILE_NAMES:
            if (path / name).is_file():
                return (path / name).resolve()
        raise WorkerFileError(
            f"{path} holds no worker file: name it one of {', '.join(WORKER_FILE_NAMES)}, "
            "or mount the file itself"
        )
    if not path.is_file():
        raise WorkerFileError(f"worker file {path} does not exist")
    if path.suffix != ".py":
        raise WorkerFileError(f"a worker file is a .py file, got {path}")
    return path.resolve()


def load_worker(spec: str | Path, *, previous: WorkerSpec | None = None) -> WorkerSpec:
    """Imports a worker file (a fresh module each call) and returns what its `start` config says.

    `previous` is the spec this one replaces (a refreshed worker): its module leaves `sys.modules`."""
    path = locate_worker_file(spec)
    if previous is not None and previous.module_name is not None:
        sys.modules.pop(previous.module_name, None)
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_podsettle_worker_{stem}_{next(_NAMES)}"
    with _IMPORT_LOCK:
        calls: list[Any] = []
        module = _import_capturing(path, module_name, calls)
    install_progress_hook()
    config = calls[-1] if calls else _start_config_from_source(path, module)
    return _spec_from_config(config, path, module_name)


def _import_capturing(path: Path, module_name: str, calls: list[Any]) -> ModuleType:
    folder = str(path.parent)
    saved_argv = sys.argv
    argv_copy = list(sys.argv)
    saved_path = list(sys.path)
    saved_hook = sys.excepthook
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    modules_before = set(sys.modules)
    added_folder = folder not in sys.path
    serverless = _runpod_serverless()
    original_start = getattr(serverless, "start", None) if serverless is not None else None

    def capture(config: Any = None, *args: Any, **kwargs: Any) -> None:
        calls.append(config)

    if serverless is not None:
        serverless.start = capture
    try:
        if added_folder:
            sys.path.insert(0, folder)
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise WorkerFileError(f"{path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except SystemExit as exc:
            sys.modules.pop(module_name, None)
            raise WorkerFileError(
                f"{path} called exit({exc.code!r}) while being imported; the sandbox kept running. "
                "A worker file should only define its handler and call runpod.serverless.start"
            ) from None
        except BaseException as exc:
            sys.modules.pop(module_name, None)
            if isinstance(exc, KeyboardInterrupt | GeneratorExit):
                raise
            summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            raise WorkerFileError(f"importing {path} failed: {summary}") from exc
        return module
    finally:
        if serverless is not None:
            serverless.start = original_start
        sys.argv = saved_argv
        saved_argv[:] = argv_copy
        sys.path[:] = saved_path
        sys.excepthook = saved_hook
        _restore_signals(saved_signals)
        if added_folder:
            _forget_siblings(folder, modules_before, keep=module_name)


def _runpod_serverless() -> Any:
    try:
        return importlib.import_module("runpod.serverless")
    except ImportError:
        return None  # a file that does not import runpod still mounts; one that does says so itself


def _restore_signals(saved: dict[signal.Signals, Any]) -> None:
    for sig, handler in saved.items():
        if signal.getsignal(sig) is handler or handler is None:
            continue
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread: the file could not have changed it either
            log.warning("worker_file.signal_not_restored", signal=sig.name)


def _forget_siblings(folder: str, before: set[str], *, keep: str) -> None:
    prefix = str(Path(folder)) + "/"
    for name in set(sys.modules) - before:
        if name == keep:
            continue
        file = getattr(sys.modules.get(name), "__file__", None)
        if file and str(Path(file).resolve()).startswith(prefix):
            sys.modules.pop(name, None)


def _start_config_from_source(path: Path, module: ModuleType) -> dict[str, Any]:
    """The config of a `start({...})` call the import did not run (under `if __name__ == "__main__"`):
    its literal keys are read from the source and its names looked up in the module. Without one, the
    module's function named `handler`."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        tree = None
    found: dict[str, Any] = {}
    for node in ast.walk(tree) if tree is not None else ():
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Dict)):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name != "start":
            continue
        for key, value in zip(node.args[0].keys, node.args[0].values, strict=True):
            if not (isinstance(key, ast.Constant) and key.value in START_KEYS):
                continue
            if isinstance(value, ast.Constant):
                found[key.value] = value.value
            elif isinstance(value, ast.Name) and hasattr(module, value.id):
                found[key.value] = getattr(module, value.id)
        if callable(found.get("handler")):
            return found
    handler = getattr(module, "handler", None)
    if callable(handler):
        return {"handler": handler}
    raise WorkerFileError(
        f"{path} did not call runpod.serverless.start({{'handler': ...}}) when imported and has no "
        "function named 'handler': call start at module level as RunPod's docs show, or name the "
        "handler function 'handler'"
    )


def _spec_from_config(config: Any, path: Path, module_name: str) -> WorkerSpec:
    if not isinstance(config, dict):
        raise WorkerFileError(f"{path}: runpod.serverless.start takes a dict, got {type(config).__name__}")
    handler = config.get("handler")
    if not callable(handler):
        raise WorkerFileError(f"{path}: the start config's 'handler' must be a function, got {handler!r}")
    modifier = config.get("concurrency_modifier")
    if modifier is not None and not callable(modifier):
        raise WorkerFileError(f"{path}: 'concurrency_modifier' must be a function of the current concurrency")
    return WorkerSpec(
        handler=handler,
        return_aggregate_stream=bool(config.get("return_aggregate_stream", False)),
        concurrency_modifier=modifier,
        refresh_worker=bool(config.get("refresh_worker", False)),
        path=path,
        module_name=module_name,
    )


def install_progress_hook() -> bool:
    """Wraps the SDK's progress sender (once per process) when the SDK is imported; True when in place.

    Nothing is imported here: a process that never imported `runpod` has no `progress_update` to call."""
    progress = sys.modules.get("runpod.serverless.modules.rp_progress")
    if progress is None:
        return False
    with _HOOK_LOCK:
        sender = getattr(progress, "_thread_target", None)
        if sender is None:
            log.warning(
                "worker_file.progress_hook_missing", reason="this runpod version has no progress sender"
            )
            return False
        if getattr(sender, "_podsettle_sandbox", False):
            return True

        def deliver(job: Any, value: Any) -> None:
            if isinstance(job, SandboxJob):
                job.report_progress(value)
            else:
                sender(job, value)

        deliver._podsettle_sandbox = True  # type: ignore[attr-defined]
        setattr(progress, "_thread_target", deliver)  # noqa: B010 (a module found at run time)
        return True
