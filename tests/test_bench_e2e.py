"""`zipkv bench-e2e` (benchmarks/e2e_decode.py) end to end on a tiny model on the CPU: every
cache kind fills, decodes and reports; graph kinds really run the static path. And what the
command says from an install without a checkout."""

import json

import pytest

from zipkv import bench_cli, cli


def test_bench_e2e_runs_every_cache_kind_on_a_tiny_model(tmp_path, capfd):
    kinds = "dynamic,zip_packed,kivi,zip_graph,kivi_graph,zipkv_graph,static_graph"
    status = cli.main(["bench-e2e", "--tiny", "--device", "cpu", "--shapes", "2x96", "--caches", kinds,
                       "--floor-context", "0", "--max-batch", "", "--graph-runs", "1", "--warmup", "1",
                       "--reps", "2", "--profile", "", "--out", str(tmp_path), "--tag", "t"])
    assert status == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["command"].startswith("zipkv bench-e2e")
    cases = {c["cache"]: c for c in res["cases"]}
    assert set(cases) == set(kinds.split(","))
    for kind, case in cases.items():
        assert "error" not in case, (kind, case.get("traceback"))
        assert case["ms_per_step"] > 0 and case["cache_bytes"] > 0
    for kind in ("zip_graph", "kivi_graph", "zipkv_graph"):
        assert cases[kind]["static"]
        assert cases[kind]["static_bytes_held"] >= cases[kind]["cache_bytes"]  # room for the steps timed
    # a run is one stream_interval of steps: it quantized a block (KIVI's 128-token fp16 window
    # still holds the whole 96-token context plus 35 steps: nothing due yet)
    assert cases["zip_graph"]["flushes"] >= 1 and cases["zipkv_graph"]["flushes"] >= 1
    # compressed caches hold fewer bytes than DynamicCache for the same tokens
    assert cases["zipkv_graph"]["cache_bytes"] < cases["dynamic"]["cache_bytes"]
    assert "| zipkv_graph | 2 x 96 |" in capfd.readouterr().out  # the benchmark runs in a child process
    assert (tmp_path / "t.png").is_file()


def test_bench_commands_list_their_options_and_say_how_to_run_without_a_checkout(monkeypatch, capsys):
    """From an installed package (no checkout found) the options still parse and --help lists
    them; running prints the exact command to run from a checkout, and no traceback."""
    with pytest.raises(SystemExit):
        cli.main(["bench-e2e", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--tiny", "--shapes", "--caches", "--out", "--max-batch"):
        assert flag in help_text
    monkeypatch.setattr(bench_cli, "find_checkout", lambda name, start=None: None)
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench-e2e", "--tiny", "--shapes", "1x64", "--out", "somewhere"])
    message = str(stop.value.code)
    assert "does not ship" in message
    assert message.endswith("python -m benchmarks.e2e_decode --tiny --shapes 1x64 --out somewhere")


def test_find_checkout_walks_up_from_a_subfolder(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "e2e_decode.py").write_text("")
    (tmp_path / "zipkv").mkdir()
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert bench_cli.find_checkout("e2e_decode", deep) == tmp_path
    assert bench_cli.find_checkout("no_such_benchmark", deep) is None
