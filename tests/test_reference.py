"""The shipped reference model: its manifest, its checksum, and parameters that load into
the network they came from (the held-out loss recorded at export, recomputed here)."""

import json
import shutil

import jax
import pytest

from cfgdiff import build, checkpoint, reference, sources

NAME = "fashion_mnist"


@pytest.fixture(scope="module")
def shipped():
  return reference.load(NAME)


def test_manifest_says_how_the_model_was_made(shipped):
  manifest = shipped.manifest
  assert manifest["name"] == NAME and manifest["step"] == shipped.config.train.num_steps
  assert len(manifest["commit"]) == 40 and "fashion_mnist_reference" in manifest["command"]
  assert manifest["bytes"] == (reference.ROOT / NAME / reference.PARAMS_FILE).stat().st_size
  assert manifest["bytes"] < 10 * 2**20, "small enough to live in the repository"
  assert manifest["parameters"] == sum(x.size for x in jax.tree.leaves(shipped.params))


def test_shipped_parameters_reproduce_their_heldout_loss_and_are_trained(shipped):
  config = shipped.config
  images, labels = sources.load_fashion_mnist(config.data.path, "test")
  images, labels = images[:reference.HELDOUT_COUNT], labels[:reference.HELDOUT_COUNT]
  loss = reference.heldout_loss(config, shipped.params, images, labels)
  # Other CPUs round differently; a wrong or mis-loaded parameter changes it by far more.
  assert loss == pytest.approx(shipped.manifest["heldout_loss"], rel=1e-3)
  untrained = build.init_state(config, build.make_model(config), build.make_optimizer(
      config.train), jax.random.PRNGKey(0)).ema_params
  assert loss < 0.2 * reference.heldout_loss(config, untrained, images, labels)


def test_a_corrupt_or_missing_parameter_file_is_refused_with_the_fix(tmp_path):
  shutil.copytree(reference.ROOT / NAME, tmp_path / NAME)
  path = tmp_path / NAME / reference.PARAMS_FILE
  blob = bytearray(path.read_bytes())
  blob[len(blob) // 2] ^= 1
  path.write_bytes(bytes(blob))
  with pytest.raises(reference.ShippedModelError, match="corrupt.*git checkout"):
    reference.load(NAME, root=tmp_path)
  path.unlink()
  with pytest.raises(reference.ShippedModelError, match="missing or corrupt"):
    reference.load(NAME, root=tmp_path)
  with pytest.raises(reference.ShippedModelError, match="no reference model 'imagenet64'"):
    reference.load("imagenet64", root=tmp_path)


def test_parameters_of_another_network_are_refused(tmp_path):
  shutil.copytree(reference.ROOT / NAME, tmp_path / NAME)
  manifest_path = tmp_path / NAME / reference.MANIFEST_FILE
  manifest = json.loads(manifest_path.read_text())
  manifest["config"]["model"]["ch"] = 16  # the manifest no longer describes the file
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(reference.ShippedModelError, match="does not match the network"):
    reference.load(NAME, root=tmp_path)


def test_unpacked_reference_is_a_run_with_the_shipped_ema_parameters(shipped, tmp_path):
  """What --mode=sweep and autoguidance read from a workdir: config.json and a checkpoint
  whose EMA parameters are the shipped ones, bit for bit."""
  import numpy as np

  from cfgdiff import configs
  workdir = reference.unpack("fashion_mnist", str(tmp_path / "shipped"))
  assert checkpoint.saved_steps(workdir) == [shipped.step]
  config = configs.from_json(str(tmp_path / "shipped" / "config.json"))
  assert config.model.to_dict() == shipped.config.model.to_dict()
  params, step = checkpoint.load_ema_params(config, workdir, build.make_mesh())
  assert step == shipped.step
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params,
               shipped.params)
  with pytest.raises(configs.ConfigError, match="already holds checkpoints"):
    reference.unpack("fashion_mnist", workdir)
