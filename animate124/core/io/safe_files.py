"""Load tensors from files without running code: safetensors, or torch pickles restricted to tensors.

A pickle may name any Python function to call while it loads; ``torch.load(weights_only=True)`` refuses such files,
but its message suggests turning the check off. :func:`load_tensors` refuses them with one line that says what the file
would have called and how to convert it.
"""
from __future__ import annotations

import contextlib
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["UnsafeFileError", "load_tensors", "weights_only_pickles", "MADE_MARKER", "mark_made", "foreign_folders"]

MADE_MARKER = ".made-by-animate124"
"""Written into every folder a tool made, so that running it again may replace that folder and no other."""
_OUR_MARKERS = (MADE_MARKER, ".complete")  # .complete: the full-size models' "finished" marker


class UnsafeFileError(ValueError):
    """The file is a pickle that would run code when loaded."""


def load_tensors(path: str | Path) -> Any:
    """The contents of a ``.safetensors`` file (dict of tensors) or of a torch pickle holding only tensors and
    containers, on the CPU.

    Raises:
        UnsafeFileError: the pickle references code (one line: what it would call, how to convert the file).
        ValueError: the file is neither (corrupt, truncated, another format).
    """
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({error})") from error
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        names = _refused_code(error, path)
        if not names:  # not a pickle torch can read (text, a truncated file): no code involved
            raise ValueError(f"{str(path)!r} is not a torch tensor file (not a pickle torch can read)") from None
        raise UnsafeFileError(
            f"{str(path)!r} is a pickle that calls {', '.join(names[:3])} when loaded, so it is refused (loading it "
            "could run any code): convert it to .safetensors where it was made (safetensors.torch.save_file on its tensors) or re-create "
            "it with `animate124 invert`, which writes .safetensors"
        ) from None
    except (RuntimeError, KeyError, EOFError, OSError) as error:
        raise ValueError(f"{str(path)!r} is not a torch tensor file ({type(error).__name__}: {error})") from error


@contextlib.contextmanager
def weights_only_pickles() -> Iterator[list]:
    """Every ``torch.load`` inside the block (diffusers' and transformers' ``.bin`` loading included) runs with
    ``weights_only=True``, whatever the caller or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` ask: older diffusers and
    transformers call ``torch.load`` without it, and torch < 2.6 (or that variable) would then run a pickle's code.

    Yields a list that receives one line per refused file (what it would call); the libraries wrap the refusal in
    their own error, so the caller raises a clearer one from it. Not thread-safe (``torch.load`` is swapped for the
    block's duration).
    """
    import torch

    original, refused = torch.load, []

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as error:
            names = _refused_code(error, f)
            if names:  # otherwise the file is no pickle at all: the caller's own error says so
                refused.append(f"{str(f)!r} is a pickle that calls {', '.join(names[:3])} when loaded, so it was "
                               "refused (loading it could run any code): use the repository's .safetensors files or "
                               "convert this one")
            raise

    torch.load = load
    try:
        yield refused
    finally:
        torch.load = original


def mark_made(folder: str | Path) -> None:
    """Mark ``folder`` as made by a tool (see :func:`foreign_folders`)."""
    (Path(folder) / MADE_MARKER).touch()


def foreign_folders(folders) -> list[Path]:
    """Those of ``folders`` that exist but were not made by a tool (no marker): writing into them could replace a
    user's files."""
    return [Path(f) for f in folders
            if Path(f).exists() and not any((Path(f) / m).is_file() for m in _OUR_MARKERS)]


_TENSOR_MODULES = ("torch", "collections", "numpy", "builtins", "_codecs")


def _refused_code(error: Exception, f: Any) -> list[str]:
    """The callables a pickle refused by ``weights_only`` would call (torch's message names the first; else read
    from the file); [] when the load failed for another reason (not a pickle, truncated, an unknown opcode)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        return [found.group(1)]
    return _code_references(Path(f)) if isinstance(f, (str, Path)) else []


def _code_references(path: Path) -> list[str]:
    """Callables a pickle names (read with pickletools, which never executes it), besides tensor rebuilding."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(member) if member else b""
        else:
            data = path.read_bytes()
        names, strings = [], []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif opcode.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
        return [n for n in dict.fromkeys(names) if not n.startswith(_TENSOR_MODULES)]
    except Exception:  # noqa: BLE001 - naming the callable is a courtesy; the file is refused either way
        return []
