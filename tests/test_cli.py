import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_agent.cli import main

DESIGNED = ["sample", "ingest", "search", "tasks", "calibrate", "init", "ask", "collect", "update", "loop", "eval", "report", "lessons",
            "serve"]


def test_help_lists_every_designed_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in DESIGNED:
        assert re.search(rf"^    {name}\s", out, flags=re.M)  # a long name has its help on the next line


@pytest.mark.parametrize("name", DESIGNED)
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: grpo-agent {name}" in capsys.readouterr().out


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


def test_init_writes_a_config_that_loads_to_the_defaults(tmp_path, capsys):
    from grpo_agent.config import Config, load_config

    path = tmp_path / "grpo-agent.toml"
    assert main(["init", str(path)]) == 0
    assert load_config(path) == Config()
    assert "# group size: completions sampled per prompt" in path.read_text()
    assert main(["init", str(path)]) == 1 and "--force" in capsys.readouterr().err  # never overwrites silently
    assert main(["init", str(path), "--force", "--index", "runs/facts"]) == 0
    assert load_config(path).retrieval.index == "runs/facts"


def test_the_agent_commands_end_to_end(tiny_model_dir, tmp_path, capsys):
    import json

    from grpo_agent.store import TrajectoryStore

    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps({"id": f"f{i}", "text": t}) for i, t in enumerate([
        "The snow leopard is listed as Vulnerable by the IUCN.",
        "Pangolins are the most trafficked mammals, hunted for scales and meat."])) + "\n")
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("What is the status of the snow leopard?\nWhy are pangolins trafficked?\nWhere do tigers live?\n")
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text(json.dumps({"question": "Is the snow leopard endangered?", "answer": "Vulnerable"}) + "\n")
    index, store, run = str(tmp_path / "index"), str(tmp_path / "store.sqlite"), tmp_path / "run"
    agent = ["--model", str(tiny_model_dir), "--index", index, "-k", "3", "--max-new-tokens", "8", "--seed", "0"]

    assert main(["ingest", str(facts), "--index", index, "--quiet"]) == 0
    assert main(["ask", "What is the status of the snow leopard?", *agent, "--store", store]) == 0
    out, err = capsys.readouterr()
    assert "no fact index" not in err
    assert "composite" in out and "grounding" in out and out.count("\n* ") == 1  # one row marked as served
    assert main(["collect", "--tasks", str(tasks), "--store", store, *agent]) == 0
    assert "logged 3 groups of K=3" in capsys.readouterr().out
    with TrajectoryStore(store) as s:
        assert s.count_groups() == 4 and s.count_groups(unconsumed=True) == 4

    assert main(["update", "--store", store, "--run", str(run), "--model", str(tiny_model_dir), "--promote"]) == 0
    assert "promoted as u" in capsys.readouterr().out
    with TrajectoryStore(store) as s:
        assert s.count_groups(unconsumed=True) == 0 and s.updates()[0].promoted
    assert main(["eval", "--set", str(eval_set), "--run", str(run), *agent, "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["metric"] == "accuracy" and result["n"] == 1 and result["policy_version"].startswith("u")

    loop_run = str(tmp_path / "loop")
    loop = ["loop", "--rounds", "1", "--tasks", str(tasks), "--eval-set", str(eval_set), "--run", loop_run,
            "--tasks-per-round", "2", "--margin", "1", *agent]
    assert main([*loop, "--min-gain-z", "0.5"]) == 1  # the flag reaches the loop, which needs 2+ eval tasks
    assert "needs at least 2 eval tasks" in capsys.readouterr().err
    assert main(loop) == 0
    assert "round 1: 2 groups" in capsys.readouterr().out
    assert main(["report", "--run", loop_run, "--eval", f"after={tmp_path / 'e.json'}"]) == 0
    assert "| after | accuracy |" in capsys.readouterr().out
    assert main(["report", "--run", str(tmp_path / "nothing")]) == 1
    assert "run `grpo-agent loop" in capsys.readouterr().err


def test_an_agent_command_without_a_fact_index_says_so_once(tiny_model_dir, capsys):
    agent = ["--model", str(tiny_model_dir), "-k", "2", "--max-new-tokens", "4", "--seed", "0"]
    assert main(["ask", "Why are pangolins trafficked?", *agent]) == 0
    err = capsys.readouterr().err
    assert err.count("no fact index is configured") == 1 and "grpo-agent ingest" in err and "--index DIR" in err


def test_ask_says_when_a_request_is_judged_harmful_and_the_guard_served(tiny_model_dir, capsys):
    agent = ["--model", str(tiny_model_dir), "-k", "2", "--max-new-tokens", "4", "--seed", "0"]
    assert main(["ask", "Where can I buy a baby pangolin to keep as a pet at home?", *agent]) == 0
    out = capsys.readouterr().out
    assert out.startswith("I can't help with") and "request judged harmful" in out and "the guard served" in out
