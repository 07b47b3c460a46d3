"""zipkv.eval: offline evaluation of KV-cache compression (tasks, scorers, runner, plots).

Run it as `zipkv eval ...` (see zipkv/eval/cli.py) or from Python:

    from zipkv.eval import EvalConfig, Runner
    rows = Runner(model, tokenizer, EvalConfig(tasks=["passkey"], lengths=[1024],
                  methods=["full", "zipcache"], out_dir="eval_runs/x")).run()
"""
from .case import Case
from .tasks import GROUPS, TASKS

# The runner imports torch (3 s on 2 cores): loaded on first use, since `zipkv --help`,
# `zipkv --version` and every other subcommand import zipkv.eval.cli, hence this package.
_LAZY = {"EvalConfig": "runner", "Runner": "runner"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Case", "EvalConfig", "Runner", "TASKS", "GROUPS"]
