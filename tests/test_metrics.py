"""The metrics schema: names, finite thresholds, what a bad step shows."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clipkit as clipkit

FACTORIES = {
    "adaptive": lambda name: clipkit.adaptive(name=name),
    "autoclip": lambda name: clipkit.autoclip(name=name),
    "global_norm": lambda name: clipkit.global_norm(1.0, name=name),
    "monitor": lambda name: clipkit.monitor(name=name),
    "per_leaf_norm": lambda name: clipkit.per_leaf_norm(1.0, name=name),
    "per_module": lambda name: clipkit.per_module(
        {"a": clipkit.global_norm(1.0)}, default=clipkit.value(1.0),
        name=name),
    "skip_spikes": lambda name: clipkit.skip_spikes(optax.sgd(0.1), name=name),
    "value": lambda name: clipkit.value(1.0, name=name),
    "zclip": lambda name: clipkit.zclip(name=name),
}


@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_every_factory_takes_a_name(factory):
  g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
  alone = FACTORIES[factory]("x")
  _, alone_state = jax.jit(alone.update)(g, alone.init(g), g)
  keys = set(clipkit.metrics(alone_state))
  assert keys and all(k.startswith("x/") for k in keys), keys
  # Wherever it sits, next to unnamed clipkit transformations too.
  for tx in (optax.chain(FACTORIES[factory]("x"), clipkit.global_norm(2.0),
                         optax.scale(-1.0)),
             optax.chain(optax.trace(0.9), FACTORIES[factory]("x"))):
    _, state = jax.jit(tx.update)(g, tx.init(g), g)
    m = clipkit.metrics(state)
    assert {k for k in m if k.startswith("x/")} == keys
    for k in keys:
      np.testing.assert_array_equal(m[k], clipkit.metrics(alone_state)[k])


def test_named_states_pickle_and_copy():
  tx = optax.chain(clipkit.monitor(name="m"),
                   clipkit.skip_spikes(clipkit.global_norm(1.0), name="g"))
  g = {"a": jnp.ones(2)}
  _, state = tx.update(g, tx.init(g), g)
  for copied in (pickle.loads(pickle.dumps(state)), copy.deepcopy(state)):
    assert jax.tree.structure(copied) == jax.tree.structure(state)
    assert clipkit.metrics(copied).keys() == clipkit.metrics(state).keys()


def test_per_module_named_keys():
  tx = clipkit.per_module({"head": clipkit.global_norm(1.0)},
                          default=optax.identity(), name="pm")
  g = {"head": jnp.ones(2), "body": jnp.ones(2)}
  _, state = tx.update(g, tx.init(g))
  assert set(clipkit.metrics(state)) == {
      "pm/grad_norm", "pm/clip_threshold", "pm/clip_scale"}


def test_per_module_prefixes_groups_only_among_several():
  g = {"enc": jnp.ones(3), "head": jnp.ones(2)}
  for rules, default, want in [
      ({"enc": clipkit.global_norm(1.0)}, optax.identity(), {"grad_norm"}),
      ({"enc": clipkit.global_norm(1.0), "head": clipkit.global_norm(2.0)},
       None, {"enc/grad_norm", "head/grad_norm"}),
      ({"enc": clipkit.global_norm(1.0, name="A"),
        "head": clipkit.global_norm(2.0)}, None,
       {"A/grad_norm", "grad_norm"}),
  ]:
    tx = clipkit.per_module(rules, default=default)
    m = clipkit.metrics(tx.update(g, tx.init(g))[1])
    assert {k for k in m if k.endswith("grad_norm")} == want


def test_a_wrapping_state_at_the_root_keeps_plain_keys():
  # skip_spikes' state holds its inner chain's: its own keys stay plain.
  g = {"w": jnp.ones(3)}
  tx = clipkit.skip_spikes(optax.chain(clipkit.global_norm(1.0),
                                       optax.sgd(0.1)))
  m = clipkit.metrics(tx.update(g, tx.init(g), g)[1])
  assert {"skipped", "skip_count", "0/grad_norm"} <= set(m)
  assert not [k for k in m if k.startswith("/")], sorted(m)


def test_zclip_threshold_is_finite_and_in_force():
  tx = clipkit.zclip(z_threshold=2.5, warmup=3)
  state = tx.init({"w": jnp.zeros(1)})
  assert float(clipkit.metrics(state)["clip_threshold"]) == 0.0
  for i, g in enumerate((1.0, 2.0, 3.0, 2.5, 40.0, 2.0)):
    before = state
    _, state = tx.update({"w": jnp.array([g])}, state)
    t = float(state.clip_threshold)
    assert np.isfinite(t)
    if i < 3:  # Warm-up: no threshold yet.
      assert t == 0.0
    else:
      want = float(before.norm_mean) + 2.5 * (float(before.norm_std) + 1e-6)
      np.testing.assert_allclose(t, want, rtol=1e-6)
      if g == 40.0:  # Clipped below the threshold, by the reciprocal rule.
        assert float(state.grad_norm * state.clip_scale) < t
  capped = clipkit.zclip(warmup=3, max_norm=0.5)
  assert float(capped.init({"w": jnp.zeros(1)}).clip_threshold) == 0.5


def test_a_nan_step_stays_visible_unlike_apply_if_finite():
  nan = {"w": jnp.array([jnp.nan])}
  ok = {"w": jnp.array([2.0])}
  inner = lambda: optax.chain(clipkit.global_norm(1.0), optax.sgd(0.1))
  for tx in (optax.apply_if_finite(inner(), 5),
             clipkit.skip_spikes(inner(), name="guard")):
    state = tx.init(ok)
    _, state = tx.update(ok, state, ok)
    out, state = tx.update(nan, state, ok)
    np.testing.assert_array_equal(out["w"], 0.0)
    m = clipkit.metrics(state)
    # Both roll the inner global_norm's state back, and its metrics with it.
    assert float(m["grad_norm"]) == 2.0
  # skip_spikes' own metrics show the bad step.
  assert float(m["guard/skipped"]) == 1.0
  assert np.isnan(float(m["guard/skip_grad_norm"]))


def test_per_module_group_holding_a_chain_keys_by_group_and_place():
  tx = clipkit.per_module({
      "lstm": optax.chain(clipkit.value(10.0), clipkit.global_norm(1.0)),
      "head": clipkit.global_norm(5.0)})
  g = {"lstm": jnp.ones(3), "head": jnp.ones(2)}
  m = clipkit.metrics(tx.update(g, tx.init(g))[1])
  assert set(m) == {"lstm/0/clip_threshold", "lstm/1/grad_norm",
                    "lstm/1/clip_threshold", "lstm/1/clip_scale",
                    "head/grad_norm", "head/clip_threshold",
                    "head/clip_scale"}
