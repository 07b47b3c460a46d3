"""benchmarks/headline.py (issue 19's headline benchmark) on a tiny Llama on the CPU: every row
kind fills, decodes and reports its fields, the capacity and prefill stages, the merge of
parts, the PNG, and the usage errors. The GPU test is the lead's pre-flight of the real run."""

import json
import types

import pytest
import torch

from benchmarks import headline
from benchmarks.headline_capacity import predict
from benchmarks.headline_rows import Setting, roofline, skip_reason

TINY = ["--tiny", "--device", "cpu", "--runs", "2", "--steps", "2", "--warmup", "1"]
DECODE_ROWS = "bf16,fp8,zipkv,hf_static_graph,dynamic_eager,hf_generate_static"


@pytest.fixture(scope="module")
def decode_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("headline")
    res = headline.main(TINY + ["--shapes", "2x64", "--rows", DECODE_ROWS, "--out", str(out), "--tag", "part1"])
    return out, res


def test_every_row_kind_decodes_and_reports_its_fields(decode_run):
    out, res = decode_run
    saved = json.loads((out / "part1.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))  # the file is what the run returned
    rows = {r["row"]: r for r in saved["rows"]}
    assert set(rows) == set(DECODE_ROWS.split(","))
    for name, rec in rows.items():
        assert "error" not in rec, (name, rec.get("traceback"))
        assert rec["ms_per_step"] > 0 and len(rec["ms_runs"]) >= 1
        assert rec["tokens_per_s"] == pytest.approx(2 / (rec["ms_per_step"] / 1e3))
        assert rec["bytes_held"] >= rec["kv_bytes"] > 0
        assert "peak_gib" in rec and rec["leaked_gib"] == 0
        assert rec["vs_bf16"] == pytest.approx(rec["tokens_per_s"] / rows["bf16"]["tokens_per_s"])
        assert rec["vs_fp8"] == pytest.approx(rec["tokens_per_s"] / rows["fp8"]["tokens_per_s"])
    # the bytes each cache holds for the same 2 x 64 tokens: bf16 = DynamicCache's K/V plus the lossless
    # layer's two bool flags per row and token (2 layers), fp8 about half, zipkv less
    assert rows["bf16"]["kv_bytes"] - rows["dynamic_eager"]["kv_bytes"] == 2 * (2 * 2 * 64)
    assert rows["fp8"]["kv_bytes"] < rows["bf16"]["kv_bytes"]
    assert rows["zipkv"]["kv_bytes"] < rows["fp8"]["kv_bytes"]
    assert rows["zipkv"]["fill"] == "kv (zipkv)" and rows["bf16"]["fill"] == "kv (layers)"
    # the StaticCache row reports each SDPA variant it ran (the CPU runs the default dispatches)
    variants = rows["hf_static_graph"]["variants"]
    assert "ms_per_step" in variants["graph"] and rows["hf_static_graph"]["best_variant"] in variants
    gen = rows["hf_generate_static"]
    assert gen["new_tokens"] == gen["warmup_steps"] + 2 * gen["steps_per_run"] + 1
    part = saved["parts"][0]
    assert part["command"].startswith("python -m benchmarks.headline --tiny")
    assert {"torch", "transformers", "device"} <= set(part["device"])
    assert any("hf_static_graph 2 x 64: best" in n for n in saved["notes"])
    assert (out / "part1.png").stat().st_size > 0


def test_capacity_and_prefill_stages(decode_run, tmp_path):
    out, _ = decode_run
    cap = 0.004  # GiB: about a dozen 64-token rows of the tiny model's bf16 cache over its weights
    res = headline.main(TINY + ["--stage", "capacity,prefill", "--capacity-rows", "bf16", "--capacity-contexts", "64",
                                "--capacity-check", "bf16", "--memory-cap-gib", str(cap),
                                "--prefill-methods", "dynamic,zipkv,snapkv,zipkv@40", "--prefill-reps", "1",
                                "--out", str(out), "--tag", "part2"])
    entry = res["capacity"][0]["methods"]["bf16@64"]
    assert entry["per_seq_bytes"] == entry["bytes_held_per_seq"] > 0  # CPU: the bytes held
    assert entry["predicted_max_batch"] == int((cap * 2**30 - entry["fixed_bytes"]) // entry["per_seq_bytes"]) >= 1
    checks = res["capacity"][0]["checks"]
    assert checks[0]["batch"] == entry["predicted_max_batch"] and checks[0]["fits"]
    assert not checks[0]["cap_enforced"]  # no allocator cap on the CPU: weights + bytes held against it
    assert entry["measured_max_batch"] == entry["predicted_max_batch"]  # on the CPU the fit is exact
    assert any(c["batch"] == entry["predicted_max_batch"] + 1 and not c["fits"] for c in checks)
    prefill = {r["method"]: r for r in res["prefill"][0]["rows"]}
    for method, rec in prefill.items():
        assert "error" not in rec, (method, rec.get("traceback"))
        assert rec["seconds"] > 0 and rec["ratio_to_dynamic"] == pytest.approx(rec["seconds"] / prefill["dynamic"]["seconds"])
    assert prefill["zipkv"]["bytes_held"] < prefill["dynamic"]["bytes_held"]
    assert prefill["zipkv@40"]["chunk"] == 40  # chunked_prefill in forwards of 40 tokens
    assert prefill["zipkv@40"]["bytes_held"] < prefill["dynamic"]["bytes_held"]

    merged = headline.main(["--merge", str(out / "part1.json"), str(out / "part2.json"), "--out", str(tmp_path),
                            "--tag", "headline_h200"])
    saved = json.loads((tmp_path / "headline_h200.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(merged["rows"]))
    assert [p["file"] for p in saved["parts"]] == ["part1.json", "part2.json"]
    assert {r["part"] for r in saved["rows"]} == {0} and saved["capacity"][0]["part"] == 1
    assert all(r["vs_bf16"] > 0 for r in saved["rows"])  # recomputed within part 0
    assert {t["status"] for t in saved["targets"]} == {"not measured"}  # the targets' shapes are GPU shapes
    assert (tmp_path / "headline_h200.png").stat().st_size > 0


def test_prefill_fill_holds_what_the_kv_fill_holds(decode_run, tmp_path):
    """--fill prefill (the model over random ids, here in 2 chunks) leaves the lossless cache
    the same bytes as the kv fill: the same tokens."""
    _, kv_run = decode_run
    res = headline.main(TINY + ["--shapes", "2x64", "--rows", "bf16", "--fill", "prefill", "--prefill-tokens", "64",
                                "--out", str(tmp_path), "--tag", "p"])
    (rec,) = res["rows"]
    assert "error" not in rec, rec.get("traceback")
    assert rec["fill"] == "prefill, chunks of 32 tokens"
    kv_bf16 = next(r for r in kv_run["rows"] if r["row"] == "bf16")
    assert rec["kv_bytes"] == kv_bf16["kv_bytes"] and rec["bytes_held"] == kv_bf16["bytes_held"]


def test_a_missing_or_non_static_method_is_one_skip_line():
    assert "not in zipkv.METHODS" in skip_reason("fp8", {})
    assert "no static form" in skip_reason("bf16", {"full": types.SimpleNamespace(static=False)})
    assert skip_reason("dynamic_eager", {}) is None


def test_merge_names_compiled_rows_and_keeps_figures(tmp_path):
    """--merge: a --compile part's rows become row+compile, their ratios compare them with the
    compiled baselines of the same part, and a later part's error row never hides a figure."""
    def row(name, ms, **extra):
        return dict(row=name, batch=8, context=64, ms_per_step=ms, tokens_per_s=8e3 / ms, part=0, **extra)

    plain = dict(parts=[{"compile": False}], rows=[row("bf16", 4.0), row("fp8", 5.0), row("zipkv", 2.0)])
    compiled = dict(parts=[{"compile": True}], rows=[row("bf16", 3.0), row("zipkv", 1.5)])
    failed = dict(parts=[{"compile": True}], rows=[dict(row="bf16", batch=8, context=64, error="skipped: deadline",
                                                        part=0)])
    paths = []
    for name, part in (("plain", plain), ("compiled", compiled), ("failed", failed)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(part, f)
    merged = headline.merge(paths, str(tmp_path), "merged")
    rows = {r["row"]: r for r in merged["rows"]}
    assert set(rows) == {"bf16", "fp8", "zipkv", "bf16+compile", "zipkv+compile"}
    assert rows["zipkv+compile"]["vs_bf16"] == pytest.approx(2.0) and "vs_fp8" not in rows["zipkv+compile"]
    assert rows["zipkv"]["vs_bf16"] == pytest.approx(2.0) and rows["zipkv"]["vs_fp8"] == pytest.approx(2.5)
    assert rows["bf16+compile"]["ms_per_step"] == 3.0  # the failed part's error row did not replace it


def test_roofline_and_capacity_fit():
    s = Setting(model=None, device=torch.device("cpu"), dtype=torch.bfloat16, timer=None, ceiling_gbps=1000.0,
                weight_bytes=3 * 10**9)
    rec = {"kv_bytes": 10**9, "ms_per_step": 6.0}
    roofline(rec, s)
    assert rec["roofline_ms"] == pytest.approx(4.0) and rec["x_roofline"] == pytest.approx(1.5)
    g = 2**30
    one = {"fill_peak_gib": 20.0, "setup_peak_gib": 21.0, "peak_gib": 20.5, "bytes_held": g, "kv_bytes": g}
    two = {"fill_peak_gib": 22.0, "setup_peak_gib": 23.5, "peak_gib": 23.0, "bytes_held": 2 * g, "kv_bytes": 2 * g}
    fit = predict(one, two, 80 * g, 0, cuda=True)  # peaks 21 and 23.5 GiB: 2.5 GiB per sequence over 18.5
    assert fit["per_seq_bytes"] == 2.5 * g and fit["fixed_bytes"] == 18.5 * g
    assert fit["predicted_max_batch"] == 24  # 18.5 + 24 x 2.5 = 78.5 <= 80 < 81


@pytest.mark.parametrize("argv, option", [
    (["--shapes", "2y64"], "--shapes"), (["--rows", "zipkv,nope"], "--rows"), (["--stage", "decode,sing"], "--stage"),
    (["--hf-static-variants", "graph,fast"], "--hf-static-variants"), (["--runs", "0"], "--runs"),
    (["--memory-cap-gib", "0"], "--memory-cap-gib"), (["--prefill-methods", "dynamic,nope"], "--prefill-methods"),
])
def test_bad_options_name_the_option(argv, option, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        headline.main(TINY + argv + ["--out", str(tmp_path)])
    assert stop.value.code == 2
    assert option in capsys.readouterr().err


@pytest.mark.gpu
def test_every_row_runs_on_cuda_at_real_layer_shapes(tmp_path):
    """Pre-flight of the H200 run: 2 layers of Llama-3-8B shapes at 2 x 4K, every row (graph
    replays, SDPA variants, compiled generate, quanto when installed), roofline fields."""
    res = headline.main(["--layers", "2", "--shapes", "2x4K", "--runs", "2", "--out", str(tmp_path), "--tag", "gpu"])
    for rec in res["rows"]:
        assert "error" not in rec, (rec["row"], rec.get("traceback"))
        assert rec["roofline_ms"] > 0 and rec["x_roofline"] > 0 and rec["peak_gib"] > 0
    graph = [r for r in res["rows"] if r["row"] not in ("dynamic_eager", "quanto2", "hf_static_graph", "hf_generate_static")]
    assert all(r["cuda_graph"] for r in graph)
    assert (tmp_path / "gpu.png").is_file()


@pytest.mark.parametrize("largest,predicted", [(45, 45), (80, 45), (30, 45), (1, 7), (0, 3)])
def test_capacity_search_finds_the_largest_fitting_batch(largest, predicted):
    from benchmarks.headline_capacity import search_batch

    seen = []
    found = search_batch(lambda b: {"fits": b <= largest}, predicted, deadline=float("inf"),
                         record=seen.append, log=lambda msg: None, tries=16)
    assert found == (largest or None)
    assert len(seen) <= 16
