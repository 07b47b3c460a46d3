"""The runner end to end on a tiny random model, and its decoding against plain references."""
import json

import pytest
import torch

from zipkv.eval import cli as eval_cli
from zipkv.eval.decode import greedy_answer, lm_metrics, reference_log_probs, teacher_forced
from zipkv.eval.methods import resolve
from zipkv.eval.methods.reference import DynamicCacheMethod
from zipkv.eval.results import ResultStore
from zipkv.eval.runner import EvalConfig, Runner
from zipkv.eval.tiny import tiny_random_model

# tasks that need no data package, so the test runs anywhere
OFFLINE_TASKS = ["passkey", "niah_single_noise"]
LENGTH = 800  # byte tokens


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_random_model(seed=0)
    return model.double(), tok  # float64: greedy ties cannot flip between equivalent paths


def _plain_greedy(model, ids, steps):
    """Reference: recompute the whole sequence every step, no cache at all."""
    ids = list(ids)
    out = []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize("mode", ["after", "inside"])
def test_greedy_through_a_cache_matches_recomputing_everything(tiny, mode):
    model, tok = tiny
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(0, 256, (90,), generator=g).tolist()
    q = torch.randint(0, 256, (7,), generator=g).tolist()  # several tokens on top of the cache
    out = greedy_answer(model, tok, DynamicCacheMethod(), ctx, q, max_new_tokens=6, mode=mode)
    assert out.tokens == _plain_greedy(model, ctx + q, 6)
    assert out.tokens_seen == len(ctx) + len(q) + 5


def test_teacher_forcing_through_a_lossless_cache_matches_one_forward(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(2)
    ctx = torch.randint(0, 256, (80,), generator=g).tolist()
    target = torch.randint(0, 256, (12,), generator=g).tolist()
    forced = teacher_forced(model, DynamicCacheMethod(), ctx, target)
    ref = reference_log_probs(model, ctx, target)
    m = lm_metrics(forced.log_probs, ref, target)
    assert m["kl"] < 1e-9 and m["top1_agreement"] == 1.0
    assert m["ppl"] == pytest.approx(m["ref_ppl"], rel=1e-9)
    # a different distribution shows up as KL > 0
    shifted = torch.log_softmax(ref + torch.randn(ref.shape, generator=g, dtype=ref.dtype), -1)
    assert lm_metrics(shifted, ref, target)["kl"] > 0.01


def test_run_rows_resume_and_summary(tiny, tmp_path):
    model, tok = tiny
    config = EvalConfig(
        tasks=OFFLINE_TASKS, lengths=[LENGTH], methods=["hf-dynamic", "full", "kivi:bits=2,residual_length=32"],
        out_dir=tmp_path, count=1, modes=["after", "inside"], model_name="tiny",
    )
    rows = Runner(model, tok, config, log=lambda m: None).run()
    assert len(rows) == len(OFFLINE_TASKS) * 2 * 3
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        for field in ("task", "length", "depth", "method", "params", "bytes_held", "fp16_bytes", "ratio", "score",
                      "seconds", "model", "zipkv_version", "transformers_version", "seed", "mode"):
            assert field in r
        assert 0.0 <= r["score"] <= 1.0 and r["context_tokens"] + r["question_tokens"] <= LENGTH + 1
        assert r["ratio"] == pytest.approx(r["fp16_bytes"] / r["bytes_held"])
    by = {(r["case_id"], r["mode"], r["method"]): r for r in rows}
    for (case, mode, method), r in by.items():
        if method == "full":  # zipkv's lossless preset answers exactly as transformers' DynamicCache
            assert r["prediction"] == by[(case, mode, "hf-dynamic")]["prediction"]
        if method == "kivi":  # 2-bit codes really shrink the cache
            assert r["ratio"] > 1.5
    # resume: nothing runs again, the file keeps one line per case
    again = Runner(model, tok, config, log=lambda m: None)
    assert len(again.run()) == len(rows)
    assert len(ResultStore(tmp_path).rows()) == len(rows)


def test_a_failing_method_leaves_an_error_row_and_runs_again_on_resume(tiny, tmp_path):
    model, tok = tiny

    class Broken(DynamicCacheMethod):
        calls = 0

        def new_cache(self, model):
            Broken.calls += 1
            raise RuntimeError("out of luck")

    def resolver(spec):
        return Broken(spec) if spec.name == "broken" else resolve(spec)

    config = EvalConfig(tasks=["passkey"], lengths=[400], methods=["broken", "hf-dynamic"], out_dir=tmp_path, count=1)
    rows = Runner(model, tok, config, resolver=resolver, log=lambda m: None).run()
    status = {r["method"]: r["status"] for r in rows}
    assert status == {"broken": "error", "hf-dynamic": "ok"}
    errors = [r for r in rows if r["status"] == "error"]
    assert len(errors) == 1 and "out of luck" in errors[0]["error"]
    Runner(model, tok, config, resolver=resolver, log=lambda m: None).run()
    assert Broken.calls == 2  # retried, while the finished case was skipped
    assert sum(r["method"] == "hf-dynamic" for r in ResultStore(tmp_path).rows()) == 1


def test_cli_end_to_end_writes_results_summary_and_plots(tmp_path, capsys):
    status = eval_cli.main([
        "eval", "--model", "tiny-random", "--tasks", "passkey", "frequent_words", "--methods", "hf-dynamic", "uniform:bits=4",
        "--lengths", "600", "--count", "2", "--out", str(tmp_path), "--seed", "3",
    ])
    assert status == 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 2  # tasks x cases x methods
    assert all(json.loads(line)["seed"] == 3 for line in lines)
    for name in ("summary.csv", "summary.md", "summary_by_method.csv", "score_vs_ratio.png", "heatmap_passkey.png"):
        assert (tmp_path / name).stat().st_size > 0
    header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert header.startswith("task,family,length,mode,method,n,score,ratio")
    assert "uniform:bits=4" in capsys.readouterr().out


def test_cli_workers_split_the_cases_and_merge_what_one_process_would_write(tmp_path):
    args = ["eval", "--model", "tiny-random", "--tasks", "passkey", "--methods", "hf-dynamic", "uniform:bits=4",
            "--lengths", "600", "--count", "3", "--seed", "3", "--threads", "1", "--no-plots"]
    assert eval_cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    assert eval_cli.main(args + ["--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    shard_rows = [len(ResultStore(tmp_path / "two" / "shards" / k).rows()) for k in "01"]
    assert shard_rows == [4, 2]  # cases 0 and 2 in shard 0, case 1 in shard 1, two methods each

    def outcome(folder):
        return {(r["case_id"], r["method_label"]): (r["score"], r["bytes_held"])
                for r in ResultStore(tmp_path / folder).latest()}

    assert outcome("two") == outcome("one") and len(outcome("one")) == 6
    assert (tmp_path / "two" / "summary.csv").stat().st_size > 0
    # a single-process run resumed with workers runs nothing again
    assert eval_cli.main(args + ["--out", str(tmp_path / "one"), "--workers", "3"]) == 0
    assert len(ResultStore(tmp_path / "one").rows()) == 6


def test_cli_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["eval", "--model", "tiny-random", "--lengths", "10", "--out", str(tmp_path)])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        eval_cli.main(["eval", "--model", "tiny-random", "--tasks", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        eval_cli.main(["eval", "--model", "tiny-random", "--workers", "0", "--out", str(tmp_path)])


def test_shards_partition_the_cases(tiny, tmp_path):
    model, tok = tiny
    cases = {}
    for k in range(3):
        config = EvalConfig(tasks=OFFLINE_TASKS, lengths=[LENGTH], methods=["full"], out_dir=tmp_path, shard=(k, 3))
        cases[k] = [c.case_id for c in Runner(model, tok, config, log=lambda m: None).cases()]
    everything = Runner(model, tok, EvalConfig(tasks=OFFLINE_TASKS, lengths=[LENGTH], methods=["full"],
                                               out_dir=tmp_path), log=lambda m: None).cases()
    assert sorted(sum(cases.values(), [])) == sorted(c.case_id for c in everything)
    assert all(cases[k] for k in cases) and not set(cases[0]) & set(cases[1])
    with pytest.raises(ValueError, match="shard"):
        EvalConfig(tasks=OFFLINE_TASKS, lengths=[LENGTH], methods=["full"], out_dir=tmp_path, shard=(3, 3))


def test_merging_shards_keeps_one_row_per_case_and_prefers_ok_rows(tmp_path):
    from zipkv.eval.workers import merge

    shards = [tmp_path / "shards" / str(k) for k in range(2)]
    ResultStore(shards[0]).append({"key": "a", "status": "ok", "score": 1.0})
    ResultStore(shards[0]).append({"key": "b", "status": "error", "score": None})
    ResultStore(shards[1]).append({"key": "b", "status": "ok", "score": 0.5})
    ResultStore(shards[1]).append({"key": "c", "status": "ok", "score": 0.0})
    rows = merge(tmp_path, shards)
    assert {r["key"]: r["score"] for r in rows} == {"a": 1.0, "b": 0.5, "c": 0.0}
    merge(tmp_path, shards)  # a rerun adds nothing
    assert len(ResultStore(tmp_path).rows()) == 4  # a, b (error), b (ok), c
    assert {r["key"]: r["status"] for r in ResultStore(tmp_path).latest()}["b"] == "ok"
