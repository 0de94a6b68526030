"""The export command a training run prints at its end: ready to paste from where launch.py ran."""
from __future__ import annotations


def test_export_command_is_relative_to_the_working_folder_and_uses_the_same_launcher(threestudio, tmp_path):
    from animate124.components.eval_outputs import export_command

    trial = tmp_path / "outputs" / "animate124-smoke" / "a_panda_is_dancing@20261205-100903"
    assert export_command(str(trial), None, cwd=str(tmp_path)) == (
        "python launch.py --config outputs/animate124-smoke/a_panda_is_dancing@20261205-100903/configs/parsed.yaml "
        "--export --gpu 0 resume=outputs/animate124-smoke/a_panda_is_dancing@20261205-100903/ckpts/last.ckpt")
    assert export_command(str(trial), "animate124 launch", cwd=str(tmp_path)).startswith(
        "animate124 launch --config outputs/animate124-smoke/") and "--gpu" not in export_command(
        str(trial), "animate124 launch", cwd=str(tmp_path))
    # outside the working folder: absolute; a name with a space is quoted for the shell
    odd = tmp_path / "my runs" / "t"
    assert export_command(str(odd), None, cwd=str(tmp_path / "elsewhere")) == (
        f"python launch.py --config '{odd}/configs/parsed.yaml' --export --gpu 0 'resume={odd}/ckpts/last.ckpt'")
