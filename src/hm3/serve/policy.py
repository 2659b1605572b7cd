"""Guard-rail policy: per task, which labels fire at which probability (a YAML or JSON file).

```yaml
spam: {flag: [spam], threshold: 0.9}       # fires when P(spam) >= 0.9
sentiment: {flag: [negative]}              # threshold defaults to 0.5
toxicity: {flag: [insult, threat], threshold: 0.3}   # multi-label: any listed label >= 0.3
```
A task fires when any of its `flag` labels has a probability at or above `threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from hm3.data.tables import read_utf8
from hm3.errors import Hm3Error
from hm3.heads import TaskGroup


@dataclass(frozen=True)
class TaskRule:
    """When one task fires: any label of `flag` with probability >= `threshold`."""

    flag: tuple[str, ...]
    threshold: float = 0.5

    def fires(self, probabilities: dict[str, float]) -> bool:
        return any(probabilities[label] >= self.threshold for label in self.flag)

    def to_dict(self) -> dict:
        return {"flag": list(self.flag), "threshold": self.threshold}


def load_policy(path: str | Path, groups: Sequence[TaskGroup]) -> dict[str, TaskRule]:
    """Read and check a policy file against the model's tasks and labels."""
    path = Path(path)
    try:
        raw = yaml.safe_load(read_utf8(path))
    except OSError as exc:
        raise Hm3Error(f"cannot read the policy file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise Hm3Error(f"{path} is not valid YAML/JSON: {exc}") from None
    return parse_policy(raw, groups, str(path))


def parse_policy(raw, groups: Sequence[TaskGroup], where: str = "policy") -> dict[str, TaskRule]:
    by_name = {g.name: g for g in groups}
    if not isinstance(raw, dict) or not raw:
        raise Hm3Error(f"{where}: expected a mapping of task -> {{flag: [labels], threshold: p}}, "
                       f"e.g. `{groups[0].name}: {{flag: [{groups[0].labels[-1]}]}}`")
    rules = {}
    for task, rule in raw.items():
        if task not in by_name:
            raise Hm3Error(f"{where}: the model has no task {task!r}; its tasks are "
                           f"{', '.join(by_name)}")
        if not isinstance(rule, dict):
            raise Hm3Error(f"{where}: {task}: expected {{flag: [labels], threshold: p}}")
        unknown = set(rule) - {"flag", "threshold"}
        if unknown:
            raise Hm3Error(f"{where}: {task}: unknown key(s) "
                           f"{', '.join(sorted(map(str, unknown)))}; allowed: flag, threshold")
        flag = rule.get("flag")
        if isinstance(flag, str):
            flag = [flag]
        labels = by_name[task].labels
        if not flag or not isinstance(flag, list) or any(label not in labels for label in flag):
            raise Hm3Error(f"{where}: {task}: `flag` must list labels of the task "
                           f"({', '.join(labels)}), got {flag!r}")
        threshold = rule.get("threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0.0 <= threshold <= 1.0:
            raise Hm3Error(f"{where}: {task}: threshold must be a probability in [0, 1], "
                           f"got {threshold!r}")
        rules[task] = TaskRule(tuple(flag), float(threshold))
    return rules
