"""The sweep's report as pure functions of its rows: the paper's Table 1 layout with
bootstrap errors for each guidance method, paired changes between weights and between
runs, the methods compared (`compare`), and the trade-off plot.
"""

from __future__ import annotations

import io
import math

import numpy as np

from cfgdiff import files
from cfgdiff.evaluation import metrics as metrics_lib
from cfgdiff.sweep import compare, store

# A difference between two weights is called resolved when it exceeds this many paired
# standard errors.
RESOLVED_SE = 2.0

DIFFERENCE_METRICS = (("FID", "fid", 2), ("score", "is_mean", 2), ("precision", "precision", 3),
                      ("recall", "recall", 3), ("accuracy", "accuracy", 3))



def _fmt(value: float, digits: int = 2) -> str:
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
      f"{value:.{digits}f}")



def _with_error(values: dict, key: str, digits: int) -> str:
  """'62.01 ± 1.83', or the value alone when it has no standard error."""
  value, error = store.number(values.get(key)), store.number(values.get(f"{key}_se"))
  text = _fmt(value, digits)
  return text if math.isnan(error) else f"{text} ± {_fmt(error, digits)}"



def results_markdown(rows: list[dict], floor: dict,
                     replicates: dict[tuple, dict[str, np.ndarray]] | None = None) -> str:
  """One section per guidance method and distinct setting (sampler, steps, v, ... feature
  net), each in the paper's Table 1 layout; rows of different settings are never in one
  table. Then, where several methods share a model and settings, their comparison.
  ``replicates``: cell key -> bootstrap replicates, for the paired differences."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(store.setting_key(row), []).append(row)
  order = {method: i for i, method in enumerate(compare.METHOD_TITLES)}
  sections = []
  for key, group in sorted(groups.items(), key=lambda item: order.get(item[0][0], 99)):
    method, guide_by = store.guidance_key(group[0])
    title, weight = compare.METHOD_TITLES.get(method, (method, "w"))
    described = ", ".join(f"{k}={v}" for k, v in zip(store.SETTINGS, key, strict=True)
                          if v and k not in store.GUIDANCE_SETTINGS)
    heading = f"### {title}" + (f" by {guide_by}" if guide_by else "") + f": {described}\n\n"
    sections.append((heading if len(groups) > 1 else "")
                    + _table_markdown(group, floor, replicates or {}, weight))
  comparison = compare.comparison_markdown(rows, replicates or {})
  return "\n".join(sections + ([comparison] if comparison else []))



def _table_markdown(rows: list[dict], floor: dict,
                    replicates: dict[tuple, dict[str, np.ndarray]], weight: str = "w") -> str:
  """The paper's Table 1 layout: rows the guidance weight (named ``weight``), one column
  per p_uncond, for FID and for the score (the latest step of each run), then precision,
  recall and class accuracy, each value ± its bootstrap standard error; then the
  differences between adjacent weights."""
  rows, latest = store.latest_rows(rows)
  runs = sorted({(float(r["p_uncond"]), r["run"]) for r in rows})
  names = {run: f"p_uncond={p:g}" for p, run in runs}
  if len(set(names.values())) < len(names):
    names = {run: f"{run} (p_uncond={p:g})" for p, run in runs}
  weights = sorted({float(r["w"]) for r in rows})
  cell = {(r["run"], float(r["w"])): r for r in rows}
  first = rows[0] if rows else {}
  lines = [f"Sampler {first.get('sampler')}, {first.get('steps')} steps, "
           f"{first.get('num_samples')} samples per cell (the same seeds and labels at every "
           f"{weight}); checkpoint steps "
           + ", ".join(f"{names[run]}: {latest[run]}" for _, run in runs) + ". "
           + (f"± is one bootstrap standard error ({first.get('bootstrap')} replicates)."
              if store.number(first.get("bootstrap")) > 0 else "No standard errors (bootstrap 0)."),
           ""]
  for title, keys, digits in (("FID (lower is better)", ("fid",), 2),
                              ("Inception-style score (higher is better)", ("is_mean",), 2),
                              ("Precision / recall (k-NN manifolds)", ("precision", "recall"), 3),
                              ("Accuracy on the requested class", ("accuracy",), 3)):
    lines += [f"**{title}**", "", f"| {weight} | " + " | ".join(names[run] for _, run in runs)
              + " |",
              "|---|" + "---|" * len(runs)]
    for w in weights:
      values = [" / ".join(_with_error(cell[(run, w)], k, digits) for k in keys)
                if (run, w) in cell else "-" for _, run in runs]
      lines.append(f"| {w:g} | " + " | ".join(values) + " |")
    lines.append("")
  accuracy = store.number(floor.get("classifier_test_accuracy"))
  count = store.number(floor.get("num_images"))
  splits = (f"held-out split {floor.get('floor_split', '?')}, reference: split "
            f"{floor.get('reference_split', '?')}")
  lines.append(f"Real held-out images ({'?' if math.isnan(count) else int(count)}, "
               f"class-balanced where the labels allow; {splits}), against the same reference "
               f"(the floor): FID {_with_error(floor, 'fid', 2)}, score "
               f"{_with_error(floor, 'is_mean', 2)}, precision "
               f"{_with_error(floor, 'precision', 3)}, recall {_with_error(floor, 'recall', 3)}, "
               f"accuracy {_with_error(floor, 'accuracy', 3)}."
               + ("" if math.isnan(accuracy) else
                  f" The feature network's own test accuracy: {100 * accuracy:.2f}%."))
  differences = _differences_markdown(runs, names, weights, cell, replicates, weight)
  return "\n".join(lines + differences) + "\n"



def paired_changes(a: dict | None, b: dict | None,
                    replicates: dict[tuple, dict[str, np.ndarray]]) -> list[str] | None:
  """Cell b minus cell a for each metric ± its paired bootstrap standard error (the same
  draws over the same seeds in every cell), marked * where resolved; None if either cell
  has no replicates."""
  ra = replicates.get(store.cell_key(a)) if a else None
  rb = replicates.get(store.cell_key(b)) if b else None
  if ra is None or rb is None:
    return None
  entries = []
  for _, key, digits in DIFFERENCE_METRICS:
    if key not in ra or key not in rb or len(ra[key]) != len(rb[key]):
      entries.append("-")
      continue
    change = store.number(b[key]) - store.number(a[key])
    error = metrics_lib.standard_error(rb[key] - ra[key])
    mark = " *" if abs(change) > RESOLVED_SE * error else ""
    entries.append(f"{change:+.{digits}f} ± {error:.{digits}f}{mark}")
  return None if all(e == "-" for e in entries) else entries



def _differences_markdown(runs, names, weights, cell, replicates, weight="w") -> list[str]:
  """The change of each metric ± its paired standard error, marked * where it exceeds
  RESOLVED_SE errors: between adjacent weights of each run, then (several runs) between
  runs of adjacent p_uncond at each weight, where both are at the same step."""
  columns = " | ".join(name for name, _, _ in DIFFERENCE_METRICS)
  rule = "|---|---|" + "---|" * len(DIFFERENCE_METRICS)
  lines = []
  by_weight = []
  for _, run in runs:
    for w0, w1 in zip(weights[:-1], weights[1:], strict=True):
      entries = paired_changes(cell.get((run, w0)), cell.get((run, w1)), replicates)
      if entries:
        by_weight.append(f"| {names[run]} | {w0:g} → {w1:g} | " + " | ".join(entries) + " |")
  if by_weight:
    lines += ["", f"**Change between adjacent weights** (paired bootstrap over the same "
              f"seeds; * where the change exceeds {RESOLVED_SE:g} standard errors)", "",
              f"| run | {weight} | {columns} |", rule] + by_weight
  by_run = []
  for w in weights:
    for (p0, run0), (p1, run1) in zip(runs[:-1], runs[1:], strict=True):
      if p0 == p1:
        continue  # two runs of one p_uncond: not a p_uncond change
      a, b = cell.get((run0, w)), cell.get((run1, w))
      if a and b and a["step"] != b["step"]:
        continue  # a run still training: the change would mix p_uncond with its length
      entries = paired_changes(a, b, replicates)
      if entries:
        by_run.append(f"| {w:g} | {names[run0]} → {names[run1]} | " + " | ".join(entries)
                      + " |")
  if by_run:
    lines += ["", f"**Change between adjacent p_uncond at each weight** (runs at the same "
              f"checkpoint step; paired bootstrap over the same seeds and labels; * where "
              f"the change exceeds {RESOLVED_SE:g} standard errors). The error is sampling "
              f"error only: with one training run per p_uncond, it leaves out how much "
              f"retraining with another seed would move a run.", "",
              f"| {weight} | runs | {columns} |", rule] + by_run
  return lines



def current_rows(rows: list[dict], settings: dict[str, str]) -> list[dict]:
  """The rows of this sweep's settings (``settings``, `store.settings`), every guidance
  method's."""
  return [r for r in rows if store.shared_key(r) == store.shared_key(settings)]



def plot_tradeoff(rows: list[dict], path: str) -> None:
  """FID against the score, one curve per run (p_uncond) and guidance method, points
  labelled with their weight, with one-standard-error bars on both."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(figsize=(6, 4.5))
  rows, _ = store.latest_rows(rows)
  curves = sorted({(float(r["p_uncond"]), r["run"], *store.guidance_key(r)) for r in rows})
  several_runs = len({c[1] for c in curves}) > 1
  markers = dict(zip(compare.METHOD_TITLES, "o^s", strict=True))
  for p_uncond, run, method, guide_by in curves:
    points = sorted((float(r["w"]), store.number(r["is_mean"]), store.number(r["fid"]),
                     store.number(r.get("is_mean_se")), store.number(r.get("fid_se")))
                    for r in rows
                    if r["run"] == run and store.guidance_key(r) == (method, guide_by))
    title, weight = compare.METHOD_TITLES.get(method, (method, "w"))
    label = title + (f", p_uncond={p_uncond:g}" if several_runs or method == "cfg" else "")
    if sum(1 for c in curves if c[1] == run and c[2] == method) > 1:
      label += f" ({guide_by})"
    axes.errorbar([p[1] for p in points], [p[2] for p in points],
                  xerr=[0 if math.isnan(p[3]) else p[3] for p in points],
                  yerr=[0 if math.isnan(p[4]) else p[4] for p in points],
                  fmt=markers.get(method, "o") + "-", capsize=2, label=label)
    for w, score, value, _, _ in points:
      axes.annotate(f"{weight}={w:g}" if method == "classifier" else f"{w:g}",
                    (score, value), textcoords="offset points", xytext=(4, 3), fontsize=7)
  axes.set_xlabel("Inception-style score (classifier)")
  axes.set_ylabel("FID (classifier features)")
  axes.set_title("Guidance trade-off: FID vs score over the weight (± 1 s.e.)")
  axes.legend(fontsize=8)
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=120)
  plt.close(figure)
  files.write_atomic(path, buffer.getvalue())
