"""Knowledge-probe columns for `gendd-report` and the benchmarks: read `probe.json`, pick one headline
metric per probe, and say which groups are the CE controls the probes must be read against.

Every metric of a run's `probe.json` is collected (`--metric probe:adversarial/same_class` works), but
the default table shows only the headlines, so it stays readable next to the accuracy columns:

- localization: IoU of the top-20% Grad-CAM pixels with the teacher's map, and Ojha et al.'s win rate
  against the CE student when the run was probed with `control=`;
- adversarial: fooling rate of the teacher's I-FGSM images (transfer of vulnerability);
- invariance: the student's consistency where the teacher is consistent (the invariances on offer);
- corruption: agreement with the teacher under Gaussian noise (mean over the levels);
- calibration: the worst teacher class's agreement. The probe's student ECE is not a headline: it is
  the run's own ECE (same checkpoint, same split), already a column of the report.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

PROBE_FILE = "probe.json"
PREFIX = "probe:"  # row keys `probe:<probe>/<metric>`: never parsed as <stage>/<split>/<metric>/<output>
CONTROL_METHOD = "ce"  # the student trained without the teacher (docs/probes.md, "The control")
# probe.json metric -> (short column label, decimals); table and plot order
HEADLINE: dict[str, tuple[str, int]] = {
    "localization/iou_top20": ("CAM IoU top-20%", 3),
    "localization/win_rate_vs_control": ("CAM win rate vs CE (%)", 2),
    "adversarial/fooling_rate": ("adv. fooling rate (%)", 2),
    "invariance/student_given_teacher": ("invariance given teacher (%)", 2),
    "corruption/noise/agree": ("noise agreement (%)", 2),
    "calibration/min_class_agree": ("worst-class agreement (%)", 2),
}
# the settings that change a method, not the student family it is compared within
METHOD_KEYS = ("method", "method.", "method/", "seed", "hydra.", "hydra/", "trainer.progress")


def read_probe(run_dir: str | Path) -> dict[str, float]:
    """The run's probe metrics as row keys (`probe:<probe>/<metric>`); {} without a readable probe.json.

    Null values (a NaN such as a win rate with no comparable image) are left out: a blank, not a 0."""
    path = Path(run_dir) / PROBE_FILE
    try:
        metrics = json.loads(path.read_text()).get("metrics") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {PREFIX + k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def headline_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The headline probe columns that at least one row has, in HEADLINE order."""
    present = {k for row in rows for k in row}
    return [PREFIX + m for m in HEADLINE if PREFIX + m in present]


def is_probe(key: str) -> bool:
    return key.startswith(PREFIX)


def probe_label(key: str) -> str:
    """`probe:adversarial/fooling_rate` -> its headline label; other probe metrics keep their name."""
    metric = key.removeprefix(PREFIX)
    return HEADLINE[metric][0] if metric in HEADLINE else metric


def probe_decimals(key: str) -> int:
    """Percentages get 2 decimals; map similarities and ratios (IoU, Spearman, `relative`) 3."""
    metric = key.removeprefix(PREFIX)
    if metric in HEADLINE:
        return HEADLINE[metric][1]
    fractions = ("localization/iou", "localization/spearman", "localization/cosine", "relative")
    return 3 if any(part in metric for part in fractions) else 2


def family(row: dict[str, Any]) -> tuple[str, ...]:
    """What a run is compared within: its overrides minus the method's settings and the seed (the
    preset, the student, the data); runs without recorded overrides form one family."""
    overrides = row.get("overrides") or []
    return tuple(sorted(o for o in overrides if not o.lstrip("+").startswith(METHOD_KEYS)))


def probed_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Group -> how many of its runs have probe metrics: the n behind its probe cells, which can be fewer
    than its runs (a run not probed yet)."""
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        if any(is_probe(k) for k in row):
            counts[row.get("group") or row["name"]] += 1
    return dict(counts)


def controls(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """CE-control group -> the groups it is the control for (itself included): every run of the group
    has method `ce`, and the controlled groups share its family. A group in two families is
    controlled by each CE group of them."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row.get("group") or row["name"]].append(row)
    families = {name: {family(r) for r in members} for name, members in groups.items()}
    ce = [n for n, members in groups.items() if all(r.get("method") == CONTROL_METHOD for r in members)]
    return {c: [n for n in groups if families[n] & families[c]] for c in ce}
