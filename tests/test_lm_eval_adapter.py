"""The lm-evaluation-harness adapter (zipkv/integrations/lm_eval.py), offline: the local tasks
of tests/data/lm_eval/ (multiple choice, generation, rolling perplexity over 6 passkey
documents) on a tiny random Llama saved to a temporary folder.

- method=full through the adapter gives lm-eval's own `hf` model's log-likelihoods,
  generations and perplexity (the adapter's prefill-then-continuation split loses nothing);
- a compressing method scores each continuation on top of a fresh compressed cache: with
  stepwise=true equal to zipkv eval's teacher-forced log-probabilities of the same tokens,
  generations equal model.generate with a fresh cache of the method, the bytes reported are
  the caches' own stats();
- model_args are split and checked before anything loads; `pretrained` goes to
  zipkv.load_model; the command line `python -m zipkv.integrations.lm_eval` runs a task.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import save_word_checkpoint
from zipkv.integrations.lm_eval import split_model_args

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "data" / "lm_eval"
DOCS = [json.loads(line) for line in (TASKS / "zipkv_tiny.jsonl").read_text().splitlines()]
QUESTION = " what is the pass key ? the pass key is"
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed: pip install 'zipkv[lm_eval]'")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sentences = [d["context"] for d in DOCS] + [QUESTION + " " + " ".join(d["choices"]) for d in DOCS]
    # head_dim 32: KIVI's value groups are 32 channels
    return save_word_checkpoint(tmp_path_factory.mktemp("tiny-llama"), sentences,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=32)


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)  # indexing lm-eval's own tasks takes seconds


def evaluate(model, task_manager, tasks, **kwargs):
    import lm_eval

    from zipkv.integrations.lm_eval import register

    register()
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=task_manager, device="cpu",
                                   log_samples=True, **kwargs)


def responses(results, task):
    """Each sample's filtered responses, in document order."""
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


# ---- model_args ---------------------------------------------------------------------------

def test_model_args_are_split_and_checked_before_anything_loads():
    own, hflm, method, params = split_model_args(
        {"pretrained": "default", "method": "snapkv", "ratio": 0.2, "window": 8, "batch_size": 1, "dtype": "auto"})
    assert (own, hflm, method, params) == ({"pretrained": "default", "dtype": "auto"}, {"batch_size": 1},
                                           "snapkv", {"ratio": 0.2, "window": 8})
    assert split_model_args({"method": "kivi:bits=4"})[2:] == ("kivi", {"bits": 4})
    assert split_model_args({})[2:] == ("zipkv", {})  # the default method
    for args, message in [
        ({"method": "nope"}, "model_args: method must be one of"),
        ({"method": "zipkv", "foo": 1}, r"model_args: zipkv does not take \['foo'\]; it accepts"),
        ({"method": "snapkv", "ratio": 0}, r"model_args: ratio=0 is outside the allowed range \(0, 1\]"),
        ({"method": "kivi", "bits": 3}, "model_args: bits"),
        ({"method": "kivi:bits=4", "bits": 2}, "bits is given twice"),
        ({"revision": "main"}, "model_args: revision is an option of lm-eval's hf model loader"),
        ({"stepwise": "yes"}, "model_args: stepwise must be true or false"),
    ]:
        with pytest.raises(ValueError, match=message):
            split_model_args(args)


@needs_lm_eval
def test_pretrained_goes_to_zipkv_load_model(model_dir, monkeypatch):
    from zipkv.integrations import lm_eval_model
    from zipkv.models import load_pretrained_dir

    calls = []

    def fake_load(name, **kwargs):
        calls.append((name, kwargs))
        return load_pretrained_dir(model_dir)

    monkeypatch.setattr(lm_eval_model, "load_model", fake_load)
    for args, name, gguf_file in [({}, "default", None), ({"pretrained": "default"}, "default", None),
                                  ({"pretrained": "/models/x.Q4.gguf"}, "/models/x.Q4.gguf", None),
                                  ({"pretrained": "/models", "gguf_file": "x.gguf"}, "/models", "x.gguf"),
                                  ({"pretrained": "qwen2.5-coder-0.5b"}, "qwen2.5-coder-0.5b", None)]:
        lm = lm_eval_model.ZipkvLM(device="cpu", **args)
        assert calls[-1] == (name, dict(dtype=torch.float32, device=torch.device("cpu"), gguf_file=gguf_file,
                                        argument="pretrained"))
        assert (lm.method, lm.method_params) == ("zipkv", {})
    monkeypatch.undo()
    with pytest.raises(ValueError, match="^pretrained must be 'default'"):
        lm_eval_model.ZipkvLM(pretrained=str(model_dir / "missing"), device="cpu")
    with pytest.raises(ValueError, match="model_args: dtype must be one of"):
        lm_eval_model.ZipkvLM(pretrained=str(model_dir), device="cpu", dtype="int3")


# ---- lossless: the adapter equals lm-eval's own hf model ----------------------------------------

@needs_lm_eval
def test_full_cache_equals_lm_eval_hf_model(model_dir, task_manager):
    tasks = ["zipkv_tiny_choice", "zipkv_tiny_gen", "zipkv_tiny_rolling"]
    ours = evaluate("zipkv", task_manager, tasks, model_args=f"pretrained={model_dir},method=full,dtype=float32")
    theirs = evaluate("hf", task_manager, tasks, model_args=f"pretrained={model_dir},dtype=float32")
    for ours_doc, theirs_doc in zip(responses(ours, "zipkv_tiny_choice"), responses(theirs, "zipkv_tiny_choice")):
        assert [g for _, g in ours_doc] == [g for _, g in theirs_doc]
        assert torch.allclose(torch.tensor([ll for ll, _ in ours_doc]), torch.tensor([ll for ll, _ in theirs_doc]),
                              atol=1e-4, rtol=0)
    assert responses(ours, "zipkv_tiny_gen") == responses(theirs, "zipkv_tiny_gen")
    perplexity = [r["results"]["zipkv_tiny_rolling"]["word_perplexity,none"] for r in (ours, theirs)]
    assert perplexity[0] == pytest.approx(perplexity[1], rel=1e-5)
    report = ours["config"]["zipkv"]
    # one cache per request: 6 docs x 3 choices, 6 generations, 6 rolling windows
    assert (report["method"], report["caches"]) == ("full", 6 * 3 + 6 + 6)
    assert report["ratio"] == pytest.approx(0.5, abs=0.02)  # the float32 states of a lossless cache


# ---- a compressing method ---------------------------------------------------------------------

def instances(kind, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)]


@needs_lm_eval
def test_continuations_are_scored_on_the_compressed_context(model_dir):
    from zipkv.eval.decode import teacher_forced
    from zipkv.eval.methods import resolve
    from zipkv.integrations.lm_eval_model import ZipkvLM

    pairs = [(d["context"] + QUESTION, " " + c) for d in DOCS[:2] for c in d["choices"]]
    pairs.append((DOCS[2]["context"], " what is the pass key ?"))  # a continuation of several tokens
    stepwise = ZipkvLM(pretrained=str(model_dir), method="zipkv", stepwise=True, device="cpu")
    got = stepwise.loglikelihood(instances("loglikelihood", pairs))
    tok, model, method = stepwise.tokenizer, stepwise.model, resolve("zipkv")
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        ctx, cont = tok(context, add_special_tokens=False).input_ids, tok(continuation, add_special_tokens=False).input_ids
        rows = teacher_forced(model, method, ctx, cont).log_probs  # zipkv eval's own decode loop
        assert ll == pytest.approx(float(rows.gather(1, torch.tensor(cont)[:, None]).sum()), abs=1e-5)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())
    report = stepwise.compression_report()
    assert report["caches"] == len(pairs) and report["ratio"] > 2  # keys 4-bit, values 2-bit, tiny tail fp16

    one_forward = ZipkvLM(pretrained=str(model_dir), method="zipkv", device="cpu")
    full = ZipkvLM(pretrained=str(model_dir), method="full", device="cpu")
    compressed = [ll for ll, _ in one_forward.loglikelihood(instances("loglikelihood", pairs))]
    lossless = [ll for ll, _ in full.loglikelihood(instances("loglikelihood", pairs))]
    assert compressed != lossless  # the context really went through the 4/2-bit cache
    assert max(abs(a - b) for a, b in zip(compressed, lossless)) < 0.5


@needs_lm_eval
def test_generations_equal_generate_with_a_fresh_cache(model_dir):
    from zipkv import cache_kwargs, make_cache
    from zipkv.integrations.lm_eval_model import ZipkvLM

    spec = {"until": ["."], "max_gen_toks": 4, "do_sample": False}
    for method, params in [("zipkv", {}), ("snapkv", {"ratio": 0.5})]:
        lm = ZipkvLM(pretrained=str(model_dir), method=method, device="cpu", **params)
        contexts = [d["context"] + QUESTION for d in DOCS[:3]]
        got = lm.generate_until(instances("generate_until", [(c, dict(spec)) for c in contexts]))
        for context, text in zip(contexts, got):
            ids = lm.tokenizer(context, return_tensors="pt")
            cache = make_cache(method, lm.model.config, **params)
            with torch.no_grad():
                out = lm.model.generate(**ids, **cache_kwargs(cache), max_new_tokens=4, do_sample=False,
                                        pad_token_id=lm.tokenizer.pad_token_id)
            expected = lm.tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
            assert text == expected.split(".")[0]
        assert lm.compression_report()["caches"] == len(contexts)


# ---- the command line -------------------------------------------------------------------------

@needs_lm_eval
def test_command_line_runs_a_local_task(model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "zipkv.integrations.lm_eval", "--model", "zipkv", "--tasks", "zipkv_tiny_choice",
               "--model_args", f"pretrained={model_dir},method=snapkv,ratio=0.5", "--include_path", str(TASKS),
               "--limit", "2", "--device", "cpu", "--output_path", str(tmp_path)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "zipkv_tiny_choice" in done.stdout  # lm-eval's results table
    [written] = list(tmp_path.rglob("results_*.json"))
    report = json.loads(written.read_text())["config"]["zipkv"]
    assert (report["method"], report["method_params"], report["caches"]) == ("snapkv", {"ratio": 0.5}, 2 * 3)


@needs_lm_eval
def test_bad_model_args_fail_before_lm_eval_starts(model_dir, capsys):
    from zipkv import cli
    from zipkv.integrations.lm_eval import main

    for argv, message in [
        (["--model", "zipkv", "--model_args", f"pretrained={model_dir},method=snapkv,ratio=0"],
         "model_args: ratio=0 is outside the allowed range (0, 1]"),
        (["--model=zipkv", "-a", "method=kivi", "bits=3"], "model_args: bits"),
        (["--model", "zipkv", "--model_args", "method=zipkv,foo=1"], "model_args: zipkv does not take ['foo']"),
    ]:
        for run in (main, lambda a: cli.main(["lm-eval", *a])):  # python -m zipkv.integrations.lm_eval / zipkv lm-eval
            assert run(argv + ["--tasks", "zipkv_tiny_choice"]) == 2
            err = capsys.readouterr().err
            assert err.startswith("zipkv lm-eval: error: ") and message in err and "Traceback" not in err


def test_without_lm_eval_the_command_says_what_to_install(monkeypatch, capsys):
    from zipkv.integrations.lm_eval import main

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ModuleNotFoundError
    assert main(["--model", "zipkv", "--tasks", "x"]) == 2
    assert "pip install 'zipkv[lm_eval]'" in capsys.readouterr().err
