"""When cfgdiff.main re-executes itself under jemalloc, and when it must not."""

from cfgdiff import allocator

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def test_cpu_host_gets_jemalloc_preloaded_with_page_retention():
  env = allocator.preload_environment({"PATH": "/bin"}, JEMALLOC, accelerator=False)
  assert env == {"PATH": "/bin", "LD_PRELOAD": JEMALLOC, "MALLOC_CONF": allocator.MALLOC_CONF}
  assert "dirty_decay_ms:-1" in allocator.MALLOC_CONF


def test_existing_preloads_and_malloc_conf_are_kept():
  env = allocator.preload_environment({"LD_PRELOAD": "/lib/libfoo.so", "MALLOC_CONF": "narenas:2"},
                                      JEMALLOC, accelerator=False)
  assert env["LD_PRELOAD"] == f"{JEMALLOC}:/lib/libfoo.so"
  assert env["MALLOC_CONF"] == "narenas:2"


def test_no_reexec_when_opted_out_missing_on_an_accelerator_or_already_preloaded():
  assert allocator.preload_environment({"CFGDIFF_MALLOC": "system"}, JEMALLOC, False) is None
  assert allocator.preload_environment({}, None, False) is None
  assert allocator.preload_environment({}, JEMALLOC, True) is None
  # The re-executed process sees its own preload and runs on: no exec loop.
  env = allocator.preload_environment({}, JEMALLOC, False)
  assert allocator.preload_environment(env, JEMALLOC, False) is None
  assert allocator.preload_environment(
      {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, JEMALLOC, False) is None


def test_jax_platforms_other_than_cpu_count_as_an_accelerator():
  assert allocator.accelerator_present({"JAX_PLATFORMS": "tpu"})
  assert allocator.accelerator_present({"JAX_PLATFORMS": "cuda,cpu"})
