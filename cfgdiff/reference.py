"""Reference models shipped with cfgdiff: a long run's EMA parameters and their manifest.

``cfgdiff/reference_models/NAME/`` holds ``ema_params.msgpack`` (flax.serialization) and
``manifest.json``: the run's config, its step, the command that trained it, the commit,
the SHA-256 and size of the parameters, and their held-out loss at export (the test
suite recomputes it: the parameters load into the network they came from).

`make sample` and notebooks/sampling.ipynb sample from it when there is no trained
workdir, so nobody has to train before seeing guided samples.

  python -m cfgdiff.reference --workdir=workdir/reference --name=fashion_mnist \
      --command="make reference"

exports the latest checkpoint of a workdir (what `make reference` ends with), and

  python -m cfgdiff.reference --name=fashion_mnist --unpack_to=workdir/shipped

writes the shipped model back as a run (config.json and a checkpoint), which
--mode=sweep evaluates and guidance methods read like any trained workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import pathlib
import subprocess
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cfgdiff import build, checkpoint, configs, data, diffusion, files, resume, sources

ROOT = pathlib.Path(__file__).parent / "reference_models"
PARAMS_FILE, MANIFEST_FILE = "ema_params.msgpack", "manifest.json"
# The held-out loss: the first HELDOUT_COUNT test images, noised with this seed.
HELDOUT_COUNT, HELDOUT_SEED = 512, 0


class ShippedModelError(RuntimeError):
  """A shipped model's files are missing, corrupt or do not match their manifest."""


@dataclasses.dataclass(frozen=True)
class Reference:
  name: str
  config: ml_collections.ConfigDict  # the config the model was trained with
  params: Any  # EMA parameters, a nested dict of numpy arrays
  manifest: dict

  @property
  def step(self) -> int:
    return int(self.manifest["step"])


def available(name: str, root: pathlib.Path | None = None) -> bool:
  return ((root or ROOT) / name / MANIFEST_FILE).exists()


def load(name: str, root: pathlib.Path | None = None) -> Reference:
  """The shipped reference model ``name`` (from ROOT unless ``root`` is given), checked
  against its manifest: checksum, then every parameter's shape against the network its
  config builds."""
  root = root or ROOT
  folder = root / name
  if not (folder / MANIFEST_FILE).exists():
    shipped = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise ShippedModelError(f"no reference model {name!r} in {root} (shipped: "
                            f"{shipped}); export one with python -m cfgdiff.reference.")
  manifest = json.loads((folder / MANIFEST_FILE).read_text())
  path = folder / PARAMS_FILE
  blob = path.read_bytes() if path.exists() else b""
  digest = hashlib.sha256(blob).hexdigest()
  if digest != manifest["sha256"]:
    raise ShippedModelError(
        f"{path} is missing or corrupt: its SHA-256 is {digest}, {folder / MANIFEST_FILE} "
        f"records {manifest['sha256']} ({manifest['bytes']} bytes). Restore it with "
        f"`git checkout -- {path}` in a clone, or reinstall cfgdiff.")
  config = configs.from_dict(manifest["config"], str(folder / MANIFEST_FILE))
  params = flax.serialization.msgpack_restore(blob)
  shapes = lambda tree: {k: tuple(np.shape(v))
                         for k, v in flax.traverse_util.flatten_dict(tree).items()}
  if shapes(params) != shapes(abstract_params(config)):
    raise ShippedModelError(f"{path} does not match the network its manifest's "
                            "config builds; export it again.")
  return Reference(name, config, params, manifest)


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """Shapes and dtypes of the network's parameters, computing nothing."""
  model = build.make_model(config)
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), *build.model_inputs(config))["params"])


def heldout_loss(config: ml_collections.ConfigDict, params: Any, images: np.ndarray,
                 labels: np.ndarray, seed: int = HELDOUT_SEED) -> float:
  """The conditional eps-prediction loss (Algorithm 1 without label dropout) of uint8
  ``images`` [N,H,W,C] with ``labels`` [N], at log-SNRs and noise drawn from ``seed``."""
  model, dc = build.make_model(config), config.diffusion
  x = jnp.asarray(data.to_model_range(images))
  batch = diffusion.noise_batch(jax.random.PRNGKey(seed), x, jnp.asarray(labels, jnp.int32),
                                p_uncond=0.0, num_classes=config.data.num_classes,
                                logsnr_min=dc.logsnr_min, logsnr_max=dc.logsnr_max)
  eps = jax.jit(lambda p, b: model.apply({"params": p}, b["z"], b["logsnr"], b["label"]))(
      params, batch)
  return float(diffusion.eps_loss(eps, batch["eps"]))


def commit() -> str:
  """The git commit cfgdiff runs from, or "unknown" outside a clone."""
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True, cwd=pathlib.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def export(workdir: str, name: str, command: str, root: pathlib.Path | None = None) -> dict:
  """Writes the EMA parameters of WORKDIR's latest checkpoint and their manifest to
  ROOT/NAME; returns the manifest."""
  config = configs.from_json(str(files.path(workdir) / "config.json"))
  if config.data.name != "fashion_mnist":
    raise configs.ConfigError(f"{workdir} was trained on {config.data.name}: only "
                              "Fashion-MNIST models are exported (the held-out loss reads "
                              "its test images).")
  ema_params, step = checkpoint.load_ema_params(config, workdir, build.make_mesh())
  params = jax.tree.map(np.asarray, jax.device_get(ema_params))
  blob = flax.serialization.msgpack_serialize(params)
  images, labels = sources.load_fashion_mnist(config.data.path, "test")
  manifest = dict(
      name=name, step=step, command=command, commit=commit(),
      exported=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob),
      parameters=int(sum(x.size for x in jax.tree.leaves(params))),
      heldout_loss=heldout_loss(config, params, images[:HELDOUT_COUNT],
                                labels[:HELDOUT_COUNT]),
      heldout=f"the first {HELDOUT_COUNT} test images, noise seed {HELDOUT_SEED}",
      config=json.loads(config.to_json_best_effort()))
  folder = (root or ROOT) / name
  folder.mkdir(parents=True, exist_ok=True)
  files.write_atomic(str(folder / PARAMS_FILE), blob)
  files.write_atomic(str(folder / MANIFEST_FILE), json.dumps(manifest, indent=2) + "\n")
  return manifest


def unpack(name: str, workdir: str, root: pathlib.Path | None = None) -> str:
  """Writes the shipped model ``name`` to WORKDIR as a run: config.json, and a checkpoint
  at its step whose EMA parameters (what sampling, --mode=sweep and autoguidance read)
  are the shipped ones. The shipped files hold nothing else, so the checkpoint's raw
  parameters are the EMA ones too and its optimizer state is fresh: evaluate it, do not
  resume its training from it. Returns WORKDIR."""
  shipped = load(name, root)
  path = files.path(workdir)
  if (path / "checkpoints").exists():
    raise configs.ConfigError(f"{workdir} already holds checkpoints: unpack the shipped "
                              "model into a new workdir.")
  config = shipped.config
  model, optimizer = build.make_model(config), build.make_optimizer(config.train)
  state = build.create_state(config, model, optimizer, build.make_mesh())
  params = jax.tree.map(lambda fresh, value: jax.device_put(
      jnp.asarray(value, fresh.dtype), fresh.sharding), state.params, shipped.params)
  state = state.replace(step=jnp.asarray(shipped.step, jnp.int32), params=params,
                        ema_params=params)
  writer = checkpoint.Checkpointer(workdir, keep=1)
  try:
    writer.save(shipped.step, state, {})
    writer.wait()
  finally:
    writer.close()
  resume.check_config(config, workdir, shipped.step)  # writes config.json
  return workdir


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", help="export: a trained run (checkpoints/)")
  parser.add_argument("--name", default="fashion_mnist")
  parser.add_argument("--command", help="export: the command that trained it")
  parser.add_argument("--unpack_to", help="write the shipped model NAME to this workdir "
                      "as a run, instead of exporting")
  args = parser.parse_args()
  if args.unpack_to:
    print(unpack(args.name, args.unpack_to))
    return
  if not (args.workdir and args.command):
    parser.error("export needs --workdir and --command (or pass --unpack_to)")
  manifest = export(args.workdir, args.name, args.command)
  print(json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=2))


if __name__ == "__main__":
  main()
