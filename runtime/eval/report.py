"""The evaluation report as Markdown tables (the same numbers as the JSON)."""

from __future__ import annotations

from typing import Any

from runtime.eval.metrics import KS

_RANK_KEYS = [f"{name}@{k}" for name in ("hr", "ndcg", "mrr") for k in KS]
_TITLES = {"recommend": "Recommendation", "search": "Personalized search", "rating": "Rating",
           "explanation": "Explanation", "selection": "Item selection"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


def _table(keys: list[str], columns: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["| metric | " + " | ".join(label for label, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_fmt(col.get(key)) for _, col in columns) + " |")
    return lines


def _columns(section: dict[str, Any], model: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return model + [(name, values) for name, values in section.get("baseline", {}).items()]


def section_markdown(task: str, section: dict[str, Any]) -> list[str]:
    """One task's table: the model's columns, then each baseline's."""
    if task in ("recommend", "search"):
        model = [("model (fast)", section)]
        model += [(f"model ({mode})", section[mode]) for mode in ("beam", "beam_constrained") if mode in section]
        keys = _RANK_KEYS
    elif task == "rating":
        model = [("model (argmax)", section),
                 ("model (expected)", {"mae": section.get("mae_expected"), "rmse": section.get("rmse_expected")})]
        keys = ["mae", "rmse"]
    elif task == "explanation":
        model = [("model", section)]
        keys = ["rouge_1", "rouge_2", "rouge_l", "bleu_1", "unigram_precision"]
    else:
        model = [("model", section)]
        keys = ["precision", "recall", "f1"]
    return [f"### {_TITLES.get(task, task)} ({section.get('count', 0)} users)", "",
            *_table(keys, _columns(section, model)), ""]


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report: a header line, one table per task, and the guard's checks when present."""
    lines = [f"## unimp eval: {report.get('model', '')} ({report.get('artifacts')}, {report.get('backend')}, "
             f"{report.get('precision')}), split {report.get('split')}, {report.get('users')} users, "
             f"{report.get('seconds', 0.0):.1f} s", ""]
    for task in _TITLES:
        if task in report:
            lines += section_markdown(task, report[task])
    guard = report.get("guard")
    if guard:
        ref = report.get("reference", {})
        lines += [f"### Accuracy guard against {ref.get('artifacts')} ({ref.get('precision')}): "
                  f"{'PASSED' if guard['passed'] else 'FAILED'}", "",
                  "| check | value | limit | passed |", "|---|---:|---:|---|"]
        for c in guard["checks"]:
            op = "<=" if c["kind"] == "max" else ">="
            lines.append(f"| {c['name']} | {c['value']:.4f} | {op} {c['limit']:.4f} | {'yes' if c['passed'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)
