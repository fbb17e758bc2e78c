"""The Python API: README's three-line example as written, the sampler options as keywords,
class names, small batches, errors, and `guided_sample` over a closed-form denoiser."""

import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

import cfgdiff
from cfgdiff import sampling
from tests.conftest import ROOT
from tests.test_samplers import MU, STD, gaussian_eps, run


def readme_python_example() -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  found = [b for b in blocks if "cfgdiff.load(" in b]
  assert len(found) == 1, "README has one Python API example"
  return found[0]


def test_readme_stays_a_guide_a_new_user_reads_in_ten_minutes():
  """Under 20 KB; depth goes to docs/, and every document it links to exists."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  assert len(text.encode()) < 20 * 1024, len(text.encode())
  linked = re.findall(r"\]\(((?:docs/|notebooks/)?[\w./-]+\.(?:md|png|ipynb))\)", text)
  assert linked and all(os.path.exists(os.path.join(ROOT, p)) for p in linked), linked


@pytest.fixture(scope="module")
def example():
  """README's example run as written: its namespace (model, images)."""
  namespace = {}
  exec(readme_python_example(), namespace)  # pylint: disable=exec-used
  return namespace


def test_readme_example_samples_the_shipped_model(example):
  images, model = example["images"], example["model"]
  assert images.shape == (8, 28, 28, 1) and images.dtype == np.uint8
  assert images.std() > 10, "an image, not a constant"
  assert model.class_names[3] == "Dress" and model.step > 0
  # The same request through the sampler the CLI uses, at the same batch: bit for bit.
  cli = sampling.CheckpointSampler.from_reference("fashion_mnist")
  cli.batch_size = 8
  cli.config.sample.update(num_steps=32)
  np.testing.assert_array_equal(images, cli.sample(np.full(8, 3), 1.0, seed=0))


def test_options_are_keywords_and_leave_the_config_as_it_was(example):
  model, images = example["model"], example["images"]
  before = model.config.sample.to_dict()
  same = model.sample(["Dress"] * 8, w=1.0, steps=32, seed=0)
  np.testing.assert_array_equal(same, images)  # class names are the indices
  other_v = model.sample([3] * 8, w=1.0, steps=32, seed=0, v=1.0)
  no_guidance_late = model.sample([3] * 8, w=1.0, steps=32, seed=0, interval=(-20.0, -5.0))
  assert not np.array_equal(other_v, images) and not np.array_equal(no_guidance_late, images)
  assert model.config.sample.to_dict() == before
  with pytest.raises(ValueError, match=r"unknown class name 'Hat'; the classes are \["):
    model.sample(["Hat"], w=1.0)
  with pytest.raises(Exception, match="sample.rescale=2.0 is invalid"):
    model.sample([3], rescale=2.0)
  assert model.config.sample.to_dict() == before


def test_load_names_what_it_can_load(tmp_path):
  with pytest.raises(cfgdiff.ModelNotFoundError, match=r"neither a workdir .* nor a shipped "
                     r"model \(\['fashion_mnist'\]\)"):
    cfgdiff.load(str(tmp_path / "nothing"))


def test_guided_sample_runs_the_samplers_over_any_eps_fn():
  labels = jnp.zeros(4000, jnp.int32)
  x = cfgdiff.guided_sample(gaussian_eps, labels, 0.0, (2, 2, 1), 1, sampler="ddim", steps=64,
                            v=0.0, clip_x=False)
  flat = np.asarray(x).reshape(4000, -1)
  # Exact eps for Gaussian data and a deterministic sampler: the data's moments.
  np.testing.assert_allclose(flat.mean(0), MU, atol=0.06)
  np.testing.assert_allclose(flat.std(0), STD, rtol=0.06)
  expected, _ = run(gaussian_eps, "ddim", 64, labels, jnp.zeros(4000), (2, 2, 1), 1)
  np.testing.assert_array_equal(flat, expected)
