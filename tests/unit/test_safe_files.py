"""Tensor files load without running code; a pickle that would run code is refused in one line."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from animate124.core.guidance.textual_inversion import read_learned_embeds
from animate124.core.io.safe_files import UnsafeFileError, load_tensors


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this file ran code",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_running_pickle_refused_in_one_line(tmp_path, writer):
    path = tmp_path / "learned_embeds.bin"
    if writer == "torch.save":
        torch.save({"_tok_": _RunsCode()}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"_tok_": _RunsCode()}, f)
    with pytest.raises(UnsafeFileError) as info:
        read_learned_embeds(path)
    message = str(info.value)
    assert message == (f"{str(path)!r} is a pickle that calls posix.system when loaded, so it is refused (loading it "
                       "could run any code): convert it to .safetensors where it was made (safetensors.torch.save_file "
                       "on its tensors) or re-create it with `animate124 invert`, which writes .safetensors")
    assert "\n" not in message and "weights_only=False" not in message


def test_tensor_files_load(tmp_path):
    from safetensors.torch import save_file

    torch.save({"_tok_": torch.ones(3)}, tmp_path / "a.bin")
    save_file({"_tok_": torch.ones(3)}, str(tmp_path / "a.safetensors"))
    for name in ("a.bin", "a.safetensors"):
        assert torch.equal(load_tensors(tmp_path / name)["_tok_"], torch.ones(3))


def test_corrupt_files_named(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"hello world")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="'.*junk.bin' is not a torch tensor file"):
        load_tensors(tmp_path / "junk.bin")
    with pytest.raises(ValueError, match="'.*junk.safetensors' is not a readable safetensors file"):
        load_tensors(tmp_path / "junk.safetensors")
