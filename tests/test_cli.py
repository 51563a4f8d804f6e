import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_agent.cli import PLANNED, main

DESIGNED = ["sample", "ingest", "search", "init", "ask", "collect", "update", "loop", "eval", "report", "serve"]


def test_help_lists_every_designed_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in DESIGNED:
        assert f"    {name} " in out


@pytest.mark.parametrize("name", DESIGNED)
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: grpo-agent {name}" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(PLANNED))
def test_planned_subcommands_say_so_plainly(name, capsys):
    assert main([name, "anything"]) == 2
    err = capsys.readouterr().err
    assert "not built yet" in err and f"issue #{PLANNED[name][1]}" in err


def test_sample_prints_k_answers(tiny_model_dir, capsys):
    code = main(["sample", "Is the tiger endangered?", "--model", str(tiny_model_dir), "-k", "3",
                 "--max-new-tokens", "5", "--seed", "0"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("tokens, mean log-prob") == 3
    assert "K=3" in out


def test_sample_reports_a_bad_model_path_without_a_traceback(tmp_path, capsys):
    assert main(["sample", "hi", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("grpo-agent sample: error: policy.model") and "Traceback" not in err


def test_sample_rejects_bad_flags_with_the_config_key(tiny_model_dir, capsys):
    assert main(["sample", "hi", "--model", str(tiny_model_dir), "-k", "0"]) == 1
    assert "sampling.k = 0" in capsys.readouterr().err


def test_console_script_is_installed():
    script = shutil.which("grpo-agent", path=str(Path(sys.executable).parent))
    assert script is not None, "pip install -e . installs the grpo-agent console script"
    out = subprocess.run([script, "sample", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: grpo-agent sample" in out.stdout
