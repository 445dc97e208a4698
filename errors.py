"""How the trainer fails: a mistake the user can fix is one sentence; anything else is a bug and keeps its traceback.

    import_quiet(module)                 a module imported without its GPU-kernel warnings
    need_package(module, setting, ...)   an optional package that does not import: one sentence naming the setting
    raised_by_library(error)             whether an error came from torch / a backend (a verdict on this machine)
                                         rather than from this trainer's code (a bug)
    first_line(error)                    an error's first line, for a one-sentence message
    quiet_imports()                      imports without the warnings torchao / bitsandbytes log about GPU kernels
"""

import contextlib
import importlib
import logging
import traceback
from pathlib import Path


@contextlib.contextmanager
def quiet_imports():
    """diffusers imports torchao and bitsandbytes when they are installed; on a machine without their GPU kernels
    they (and diffusers about them) log warnings at import that say nothing about this run. Logging below
    ERROR is off for the import only."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def import_quiet(module: str):
    """`module`, imported without the warnings torchao / bitsandbytes log about GPU kernels a CPU build lacks."""
    with quiet_imports():
        return importlib.import_module(module)


def need_package(module: str, setting: str, instead: str, package: str = "", pip: str = "") -> None:
    """Imports `module` (quietly), or stops the run in one sentence: `setting` needs `package` (the module's name
    by default), `pip install <pip>` (the package by default) brings it, `instead` says what else to choose."""
    try:
        import_quiet(module)
    except ImportError as error:
        package = package or module
        raise SystemExit(f"{setting} needs the {package} package, which does not import here ({error}); "
                         f"pip install {pip or package}, {instead}")


def raised_by_library(error: BaseException) -> bool:
    """Whether `error` was raised outside this trainer's own modules (in torch, torchao, bitsandbytes, ...): a
    backend's verdict on this machine, which a start-up check may turn into one sentence. One raised in our code is
    a bug and keeps its traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    return not frames or Path(frames[-1].filename).resolve().parent != Path(__file__).resolve().parent


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
