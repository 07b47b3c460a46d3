"""benchmarks/registry_decode.py on the CPU: every registry method gets settings it accepts
(mikv's required ratio included: the H200 run lost its row to "mikv takes ratio"), and a
--tiny run of the static methods gives each one a row without an error."""

import json

import pytest

import zipkv
from benchmarks import registry_decode
from tiny_models import tiny_model
from zipkv.registry import check_method


@pytest.mark.parametrize("name", sorted(zipkv.METHODS))
def test_every_method_builds_from_the_benchmarks_settings(name):
    spec = zipkv.METHODS[name]
    params = registry_decode.method_params(spec)
    check_method(name, params)
    cache = spec.build(tiny_model("llama").config, **params)
    assert cache is not None
    if spec.takes_budget and spec.family != "tiered":
        assert params["ratio"] == 0.2  # the evicting methods keep a fifth
    if name == "mikv":
        assert params["ratio"] == 0.2


def test_a_method_that_cannot_be_built_is_one_rows_error(tmp_path, monkeypatch):
    monkeypatch.setitem(registry_decode.METHOD_PARAMS, "kivi", dict(budget=7))  # kivi has no budget
    res = registry_decode.main(["--tiny", "--device", "cpu", "--methods", "kivi,mikv", "--batch", "1",
                                "--context", "64", "--runs", "1", "--steps", "1", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["cases"]}
    assert "kivi does not take ['budget']" in rows["kivi"]["error"]
    assert "error" not in rows["mikv"], rows["mikv"].get("traceback")
    assert rows["mikv"]["params"] == {"ratio": 0.2} and rows["mikv"]["ms_per_step"] > 0
    saved = json.loads((tmp_path / "registry_decode.json").read_text())
    assert [c["method"] for c in saved["cases"]] == ["kivi", "mikv"]


def test_merge_keeps_the_last_measurement_of_each_method_and_its_run(tmp_path):
    import json

    from benchmarks import registry_decode

    def part(name, cases, gbps):
        path = tmp_path / name
        path.write_text(json.dumps(dict(command=f"run {name}", copy_bandwidth=dict(gbps=gbps), cases=cases)))
        return str(path)

    a = part("a.json", [dict(method="snapkv", ms_per_step=7.0), dict(method="h2o", ms_per_step=99.0)], 4100.0)
    b = part("b.json", [dict(method="h2o", ms_per_step=9.8)], 4150.0)
    out = tmp_path / "merged.json"
    registry_decode.merge(str(out), [a, b], draw=False)
    merged = json.loads(out.read_text())
    by_name = {c["method"]: c for c in merged["cases"]}
    assert by_name["h2o"]["ms_per_step"] == 9.8 and by_name["snapkv"]["ms_per_step"] == 7.0
    assert merged["runs"][by_name["h2o"]["run"]]["copy_bandwidth"]["gbps"] == 4150.0
    assert merged["runs"][by_name["snapkv"]["run"]]["file"] == "a.json"
