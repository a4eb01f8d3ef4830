"""The demo does what it says: unclipped it diverges, each strategy trains."""

import jax.numpy as jnp
import numpy as np

import optax_clipkit as clipkit
from optax_clipkit import demo


def test_no_clipping_diverges_and_every_strategy_trains():
  x, y = map(jnp.asarray, demo.make_data())
  (x_train, x_test), (y_train, y_test) = jnp.split(x, 2), jnp.split(y, 2)
  assert len(demo.STRATEGIES) == 8
  for name, clip in demo.STRATEGIES.items():
    params, state = demo.train(clip, x_train, y_train)
    test_mse = float(demo.mse(params, x_test, y_test))
    if clip is None:
      assert np.isnan(test_mse)
      continue
    assert test_mse < 0.005 * np.var(np.asarray(y)), name
    thresholds = [v for k, v in clipkit.metrics(state).items()
                  if k.endswith("clip_threshold")]
    assert thresholds and all(t > 0 for t in thresholds), name


def test_main_prints_a_row_per_strategy(capsys, monkeypatch):
  monkeypatch.setattr(demo, "STRATEGIES",
                      {"global_norm(1.0)": clipkit.global_norm(1.0)})
  demo.main()
  out = capsys.readouterr().out
  assert "| global_norm(1.0) |" in out and "without clipping" in out
