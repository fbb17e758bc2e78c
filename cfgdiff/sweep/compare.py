"""Guidance methods compared on one model, as pure functions of the sweep's rows.

Each method is a curve over its own weight grid. Weights of different methods mean
different things, so methods are compared where they reach the same fidelity: for each
weight of the reference method (classifier-free guidance), the class accuracy it reaches
(the score where there is no accuracy) is found on the other method's curve by linear
interpolation between its adjacent weights, and FID there is compared. The error of that
difference is paired: every cell's bootstrap replicates resample the same positions over
the same seeds and labels, so the comparison is redone on each replicate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cfgdiff.evaluation import metrics as metrics_lib
from cfgdiff.sweep import store

# Method -> (title, the name of its weight).
METHOD_TITLES = {"cfg": ("Classifier-free guidance", "w"),
                 "classifier": ("Classifier guidance", "s"),
                 "auto": ("Autoguidance", "w")}

# A matched difference is marked resolved beyond this many paired standard errors.
RESOLVED_SE = 2.0



def crossing(weights: Sequence[float], xs: Sequence[float], ys: Sequence[float],
             target: float) -> tuple[float, float] | None:
  """Where the curve (weight -> x, y), piecewise linear in weight order, first reaches
  x = ``target``: (the weight there, y there); None when x never reaches it."""
  for j in range(len(xs)):
    if xs[j] == target:
      return weights[j], ys[j]
    if j + 1 < len(xs) and min(xs[j], xs[j + 1]) < target < max(xs[j], xs[j + 1]):
      t = (target - xs[j]) / (xs[j + 1] - xs[j])
      return (weights[j] + t * (weights[j + 1] - weights[j]), ys[j] + t * (ys[j + 1] - ys[j]))
  return None



def matched_error(reference: dict[str, np.ndarray], curve: list[dict[str, np.ndarray]],
                  weights: Sequence[float], match: str) -> float:
  """The paired bootstrap standard error of (the curve's FID at the reference cell's
  ``match`` value) - (the reference cell's FID). ``reference``, ``curve``: replicates of
  the reference cell and of each of the curve's cells (in ``weights`` order). NaN when
  fewer than half the replicates reach the reference's value."""
  differences = []
  for b in range(len(reference["fid"])):
    found = crossing(weights, [c[match][b] for c in curve], [c["fid"][b] for c in curve],
                     reference[match][b])
    if found is not None:
      differences.append(found[1] - reference["fid"][b])
  if len(differences) < len(reference["fid"]) / 2:
    return math.nan
  return metrics_lib.standard_error(np.asarray(differences))



def _matching_metric(rows: list[dict]) -> str | None:
  """Class accuracy where every row has it, else the score; None when neither."""
  for key in ("accuracy", "is_mean"):
    if rows and all(math.isfinite(store.number(r.get(key))) for r in rows):
      return key
  return None



def _curve_label(method: str, guide_by: str, several: bool) -> str:
  title = METHOD_TITLES.get(method, (method, "w"))[0]
  return f"{title} ({guide_by})" if several and guide_by else title



def comparison_markdown(rows: list[dict],
                        replicates: dict[tuple, dict[str, np.ndarray]]) -> str:
  """For each run whose latest step has several guidance methods under the same other
  settings: each method's best FID with its cost per sample, then FID at matched class
  accuracy (or score) against classifier-free guidance, with paired errors. '' when no
  run has two methods."""
  rows, _ = store.latest_rows(rows)
  groups: dict[tuple, dict[tuple, list[dict]]] = {}
  for row in rows:
    curves = groups.setdefault((row["run"], row["step"], store.shared_key(row)), {})
    curves.setdefault(store.guidance_key(row), []).append(row)
  order = {method: i for i, method in enumerate(METHOD_TITLES)}
  sections = []
  for (run, step, _), curves in groups.items():
    if len({method for method, _ in curves}) < 2:
      continue
    curves = {key: sorted(cells, key=lambda r: float(r["w"]))
              for key, cells in sorted(curves.items(), key=lambda c: (order.get(c[0][0], 99),
                                                                       c[0][1]))}
    several = len(curves) > len({method for method, _ in curves})
    labels = {key: _curve_label(*key, several) for key in curves}
    lines = [f"### Guidance methods compared: {run}, step {step}", "",
             "Each method over its own weights, on the same seeds and labels. Network "
             "passes per sample are those its guide declares for the sampler's steps; "
             "seconds per sample are the median over its cells (the first of each method "
             "includes compiling).", "",
             "| method | best FID | at | accuracy | score | forward passes | backward passes "
             "| seconds / sample |", "|---|---|---|---|---|---|---|---|"]
    for key, cells in curves.items():
      best = min(cells, key=lambda r: store.number(r["fid"]))
      weight = METHOD_TITLES.get(key[0], (key[0], "w"))[1]
      seconds = np.median([store.number(r.get("seconds_per_sample")) for r in cells])
      lines.append(
          f"| {labels[key]} | {_value(best, 'fid', 2)} | {weight}={float(best['w']):g} | "
          f"{_value(best, 'accuracy', 3)} | {_value(best, 'is_mean', 2)} | "
          f"{best.get('nfe_per_sample') or '-'} | {best.get('backward_per_sample') or '-'} | "
          f"{'-' if math.isnan(seconds) else f'{seconds:.3g}'} |")
    lines += _matched_lines(curves, labels, replicates)
    sections.append("\n".join(lines) + "\n")
  return "\n".join(sections)



def _value(row: dict, key: str, digits: int) -> str:
  value, error = store.number(row.get(key)), store.number(row.get(f"{key}_se"))
  if math.isnan(value):
    return "-"
  return f"{value:.{digits}f}" + ("" if math.isnan(error) else f" ± {error:.{digits}f}")



def _matched_lines(curves: dict[tuple, list[dict]], labels: dict[tuple, str],
                   replicates: dict[tuple, dict[str, np.ndarray]]) -> list[str]:
  """The matched-fidelity table against the first curve (classifier-free guidance when
  swept)."""
  match = _matching_metric([r for cells in curves.values() for r in cells])
  if match is None:
    return []
  (reference_key, reference), *others = curves.items()
  name = "class accuracy" if match == "accuracy" else "score"
  lines = ["", f"**FID at matched {name}**: for each weight of {labels[reference_key]}, "
           f"the other methods' FID where their {name} reaches the same value (linear "
           "between adjacent weights; '-' where it never does), and its change from "
           f"{labels[reference_key]} ± the paired bootstrap error (* beyond {RESOLVED_SE:g} "
           "errors).", ""]
  header = f"| {METHOD_TITLES.get(reference_key[0], ('', 'w'))[1]} | {name} | FID |"
  for key, _ in others:
    header += f" {labels[key]}: {METHOD_TITLES.get(key[0], ('', 'w'))[1]} | FID | change |"
  lines += [header, "|" + "---|" * (3 + 3 * len(others))]
  for cell in reference:
    target = store.number(cell[match])
    entries = [f"{float(cell['w']):g}", f"{target:.3f}", f"{store.number(cell['fid']):.2f}"]
    for _, cells in others:
      weights = [float(r["w"]) for r in cells]
      found = crossing(weights, [store.number(r[match]) for r in cells],
                       [store.number(r["fid"]) for r in cells], target)
      if found is None:
        entries += ["-", "-", "-"]
        continue
      change = found[1] - store.number(cell["fid"])
      own = replicates.get(store.cell_key(cell))
      theirs = [replicates.get(store.cell_key(r)) for r in cells]
      error = math.nan
      if own is not None and all(t is not None for t in theirs) and all(
          match in r and "fid" in r for r in [own, *theirs]):
        error = matched_error(own, theirs, weights, match)
      text = f"{change:+.2f}" + ("" if math.isnan(error) else f" ± {error:.2f}")
      if not math.isnan(error) and abs(change) > RESOLVED_SE * error:
        text += " *"
      entries += [f"{found[0]:.3g}", f"{found[1]:.2f}", text]
    lines.append("| " + " | ".join(entries) + " |")
  return lines
