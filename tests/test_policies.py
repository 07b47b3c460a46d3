"""zipkv/policies: the budget-rule table of SelectPolicy, its contract, the builders the
registry names, and the base hook dispatch."""

import inspect
from importlib import import_module

import pytest
import torch

import zipkv.policies.select as select
from zipkv import cache_kwargs
from zipkv.cache.eviction_cache import EvictionCache
from zipkv.eviction import adakv_head_budgets, make_scorer, pyramid_budgets
from zipkv.policies import BUDGET_RULES, CakePolicy, Policy, SelectPolicy
from zipkv.policies.select import RULE_CONTEXT, build_select, rule_params_of
from zipkv.registry import METHODS, names
from tiny_models import padded_batch, tiny_model


def _inputs(seed=0, b=2, h=3, t=20, pad=(0, 5)):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, h, t, generator=g)
    real = torch.ones(b, t, dtype=torch.bool)
    for row, n in enumerate(pad):
        real[row, :n] = False
    scores = scores.masked_fill(~real[:, None, :], float("-inf"))
    return scores, real


@pytest.mark.parametrize("rule", sorted(BUDGET_RULES))
def test_every_rule_takes_the_contract_keywords(rule):
    params = inspect.signature(BUDGET_RULES[rule]).parameters
    assert list(params)[:3] == ["scores", "budgets", "real"]
    for name in RULE_CONTEXT:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_rules_equal_the_pure_budget_functions_row_by_row():
    scores, real = _inputs()
    budgets = torch.tensor([8, 6])
    lengths = real.sum(1).tolist()  # 20, 15
    uniform = BUDGET_RULES["uniform"](scores, budgets, real, layer=1, num_layers=4, window=2)
    assert torch.equal(uniform, budgets)
    pyramid = BUDGET_RULES["pyramid"](scores, budgets, real, layer=1, num_layers=4, window=2, beta=4.0)
    assert pyramid.tolist() == [pyramid_budgets(4, c, n, window=2, beta=4.0)[1] for c, n in zip([8, 6], lengths)]
    adakv = BUDGET_RULES["adakv"](scores, budgets, real, layer=0, num_layers=4, window=2, alpha=0.5)
    for row, (c, n) in enumerate(zip([8, 6], lengths)):  # each row over its real tokens only
        alone = adakv_head_budgets(scores[row : row + 1, :, 20 - n :], c, alpha=0.5)[0]
        assert torch.equal(adakv[row], alone)
        assert int(adakv[row].sum()) == 3 * c


def test_rule_params_are_the_rules_own_keywords():
    settings = dict(window=6, kernel_size=3, pooling="max", beta=4.0, alpha=0.3)
    assert rule_params_of("pyramid", settings) == {"beta": 4.0}
    assert rule_params_of("adakv", settings) == {"alpha": 0.3}
    assert rule_params_of("uniform", settings) == {}
    policy = build_select(None, rule="pyramid", scorer="snapkv", ratio=0.5, **settings)
    assert policy.rule_params == {"beta": 4.0} and policy.window == 6


def test_unknown_rule_names_the_table():
    with pytest.raises(ValueError, match=r"rule='staircase' is not one of \['adakv', 'pyramid', 'uniform'\]"):
        SelectPolicy(ratio=0.5, scorer=make_scorer("key_norm"), rule="staircase")
    with pytest.raises(ValueError, match="rule='uniform': CakePolicy's rule is 'cake'"):
        CakePolicy(ratio=0.5, scorer=make_scorer("cake"), rule="uniform")


def test_a_new_rule_is_one_table_line(monkeypatch):
    """A rule added to the table alone drives a real cache: each row of layer l keeps
    budget - l tokens (a rule no shipped method has)."""

    def shrinking(scores, budgets, real, *, layer, num_layers, window, step=1):
        return budgets - step * layer

    monkeypatch.setitem(BUDGET_RULES, "shrinking", shrinking)
    model = tiny_model("llama", num_hidden_layers=3)
    ids, mask = padded_batch(length=30, pad=4, seed=2, batch=2)
    policy = build_select(None, rule="shrinking", scorer="key_norm", budget=10, step=2)
    assert policy.rule_params == {"step": 2}
    cache = EvictionCache(model.config, policy, method="shrinking")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
    for position, layer in enumerate(cache.evicting_layers()):
        (store,) = layer.parts
        assert store.lengths.tolist() == [[10 - 2 * position] * 2] * 2


@pytest.mark.parametrize("method", names("evict", "tiered"))
def test_every_evicting_method_builds_through_its_policy_file(method):
    """The registry names each builder as "<file>.<function>" of zipkv/policies/."""
    spec = METHODS[method]
    params = {"ratio": 0.5} if spec.takes_budget else {}
    cache = spec.build(tiny_model("llama", num_hidden_layers=2).config, **params)
    assert isinstance(cache.policy, Policy)
    assert type(cache.policy).__module__.startswith("zipkv.policies.")
    module = import_module(type(cache.policy).__module__)
    assert any(name.startswith("build_") for name in vars(module))


def test_after_forward_dispatches_first_forward_to_on_prefill():
    calls = []

    class Probe(Policy):
        def on_prefill(self, layer, query, scaling):
            calls.append(("prefill", layer, scaling))

        def on_decode(self, layer, query, scaling):
            calls.append(("decode", layer, scaling))

    probe = Probe()
    probe.after_forward("L", None, 0.5, first=True)
    probe.after_forward("L", None, 0.25, first=False)
    assert calls == [("prefill", "L", 0.5), ("decode", "L", 0.25)]


def test_select_module_imports_each_rule_from_its_budget_file():
    for rule, function in select.BUDGET_RULES.items():
        assert function.__module__.startswith("zipkv.eviction.budgets."), rule


@pytest.mark.parametrize("kind,settings", [("budget", {"budget": 36}), ("ratio", {"ratio": 0.9}), ("small", {"ratio": 0.5})])
def test_row_budgets_of_an_unpadded_prompt_on_the_host_equal_the_device_ones(kind, settings):
    """The host path (the layer knows its prompt has no padding) gives the budgets and the
    errors of the general one."""
    policy = build_select(None, rule="uniform", scorer="snapkv", **settings)
    real = torch.ones(3, 40, dtype=torch.bool)
    if kind == "small":  # fewer tokens than the observation window the method always keeps
        for unpadded in (False, True):
            with pytest.raises(ValueError, match="fewer than the 32 tokens the method always keeps"):
                policy.row_budgets(real, unpadded=unpadded)
        return
    assert torch.equal(policy.row_budgets(real, unpadded=True), policy.row_budgets(real))
