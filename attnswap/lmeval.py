"""The lm-evaluation-harness hand-off: lm-eval's `simple_evaluate` on the model object attnswap loaded.

The converted model runs as it is (its methods, kernels and member axis), wrapped by lm-eval's own `HFLM`
around the object, not re-loaded through plain transformers. lm-eval is an optional extra
(`pip install -e ".[eval]"`). attnswap ships one small offline task (`tasks/`, `attnswap_wikitext_nextsent`),
found by lm-eval beside any `--include-path` of the user's.
"""
from __future__ import annotations

from pathlib import Path

from .errors import AttnswapError

TASKS = Path(__file__).resolve().parent / "tasks"


def _lm_eval():
    """lm-eval's module, or a one-line error saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise AttnswapError("eval lm-eval needs lm-evaluation-harness: pip install -e \".[eval]\" "
                            "(or pip install \"lm_eval[hf]\")") from None
    return lm_eval


def task_manager(include_path: str | None = None, tasks: list[str] | None = None):
    """lm-eval's task index over attnswap's tasks and `include_path`, plus lm-eval's own ~15k unless every one
    of `tasks` is found without them (indexing those takes ~9 s)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS), *([include_path] if include_path else [])]
    if tasks:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=paths)


def check_tasks(tasks: list[str], include_path: str | None = None):
    """One-line error for a task lm-eval does not know (before any weight is read)."""
    if include_path and not Path(include_path).is_dir():
        raise AttnswapError(f"--include-path '{include_path}' is not a folder of task YAMLs")
    tm = task_manager(include_path, tasks)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise AttnswapError(f"lm-eval knows no task {', '.join(map(repr, unknown))}; the offline one shipped with "
                            "attnswap is 'attnswap_wikitext_nextsent' (others need their datasets on this machine)")
    return tm


def evaluate(model, tokenizer, tasks: list[str], *, num_fewshot: int | None = None, limit: int | None = None,
             include_path: str | None = None, batch_size: int = 1, tm=None) -> dict:
    """lm-eval's results dict (`results`, `configs`, `versions`, ...) for `model`, and its table as `table`."""
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import make_table

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                          task_manager=tm or task_manager(include_path), log_samples=False,
                          bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                          fewshot_random_seed=0)
    keep = {k: res[k] for k in ("results", "versions", "n-shot", "higher_is_better", "n-samples") if k in res}
    keep["table"] = make_table(res)
    return keep
