"""Contrastive losses vs a float64 numpy reference; chunked == unchunked (values and grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmr_jax.training import losses


def np_reference(a, b, scale, bias=None, pos_mask=None, weights=None, kind="softmax"):
  """Returns the loss from explicit loops over pairs, in float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  n = a.shape[0]
  w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
  pm = np.zeros((n, n), bool) if pos_mask is None else np.asarray(pos_mask, bool)
  total_a = total_b = 0.0
  for i in range(n):
    if kind == "softmax":
      # Row i: a_i against every b_j that is not another positive of i.
      row = [scale * a[i] @ b[j] for j in range(n) if j == i or not pm[i, j]]
      # Column i: b_i against every a_j for which (j, i) is not another positive.
      col = [scale * a[j] @ b[i] for j in range(n) if j == i or not pm[j, i]]
      pos = scale * a[i] @ b[i]
      total_a += w[i] * (np.log(np.sum(np.exp(row))) - pos)
      total_b += w[i] * (np.log(np.sum(np.exp(col))) - pos)
    else:
      for j in range(n):
        z = scale * a[i] @ b[j] + bias
        label = 1.0 if (i == j or pm[i, j]) else -1.0
        total_a += w[i] * np.log1p(np.exp(-label * z))
  if kind == "softmax":
    return 0.5 * (total_a + total_b) / w.sum()
  return total_a / w.sum()


def _jit(f):
  """Returns jax.jit(f) with cheap XLA backend optimisation: these tests are compile-bound."""
  return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0})


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  n, d = 7, 5
  a, b = _unit(rng, n, d), _unit(rng, n, d)
  # Rows 1 and 4 hold the same product; row 2's query also likes product 60 (row 5's).
  product_index = np.array([10, 20, 30, 40, 20, 60, 70], np.int32)
  positives = np.full((n, 3), -1, np.int32)
  positives[2, :2] = [30, 60]
  return a, b, product_index, positives


def test_make_pos_mask(data):
  _, _, pidx, positives = data
  m = np.asarray(losses.make_pos_mask(pidx, positives))
  expected = np.eye(7, dtype=bool)
  expected[1, 4] = expected[4, 1] = True  # Same product.
  expected[2, 5] = True  # Product 60 among row 2's positives; NOT symmetric.
  np.testing.assert_array_equal(m, expected)
  # -1 padding never matches, even a (bogus) product id -1 in the batch.
  m2 = np.asarray(losses.make_pos_mask(np.array([-1, 5]), np.array([[-1], [-1]])))
  np.testing.assert_array_equal(m2, np.eye(2, dtype=bool))


def test_softmax_matches_reference_both_directions(data):
  a, b, pidx, positives = data
  t = np.log(1 / 0.07)
  loss, m = losses.softmax_contrastive(a, b, t)
  ref = np_reference(a, b, 1 / 0.07)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  # Directions differ (a @ b.T is not symmetric) and average to the loss.
  assert abs(float(m["loss_a2b"]) - float(m["loss_b2a"])) > 1e-3
  np.testing.assert_allclose(0.5 * (m["loss_a2b"] + m["loss_b2a"]), loss, rtol=1e-6)
  # Swapping a and b swaps the directions.
  _, m_sw = losses.softmax_contrastive(b, a, t)
  np.testing.assert_allclose(m_sw["loss_a2b"], m["loss_b2a"], rtol=1e-5)


def test_softmax_duplicate_masking(data):
  a, b, pidx, positives = data
  mask = np.asarray(losses.make_pos_mask(pidx, positives))
  w = np.array([1.0, 0.1, 1.0, 1.0, 0.01, 1.0, 0.5], np.float32)
  loss, _ = losses.softmax_contrastive(a, b, np.log(10.0), pos_mask=mask, weights=w)
  ref = np_reference(a, b, 10.0, pos_mask=mask, weights=w)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  unmasked = np_reference(a, b, 10.0, weights=w)
  assert abs(ref - unmasked) > 1e-3  # The mask changes the loss.
  # Exact duplicate pair (rows 1 and 4): masked, row 1's loss is what it would be with row 4
  # absent from the batch; unmasked, the duplicate is a hard negative and the loss is higher.
  a2, b2 = a.copy(), b.copy()
  a2[4], b2[4] = a2[1], b2[1]
  one_hot = np.eye(7, dtype=np.float32)[1]
  l_dup, _ = losses.softmax_contrastive(a2, b2, np.log(10.0), pos_mask=losses.make_pos_mask(pidx),
                                        weights=one_hot)
  keep = [0, 1, 2, 3, 5, 6]
  l_without, _ = losses.softmax_contrastive(a2[keep], b2[keep], np.log(10.0),
                                            weights=one_hot[keep])
  np.testing.assert_allclose(l_dup, l_without, rtol=1e-5)
  l_unmasked, _ = losses.softmax_contrastive(a2, b2, np.log(10.0), weights=one_hot)
  assert float(l_unmasked) > float(l_dup) + 0.1


def test_softmax_scale_is_clipped(data):
  a, b, *_ = data
  l_big, m = losses.softmax_contrastive(a, b, 10.0)  # exp(10) >> 100
  l_100, _ = losses.softmax_contrastive(a, b, np.log(100.0))
  np.testing.assert_allclose(l_big, l_100, rtol=1e-6)
  assert float(m["scale"]) == pytest.approx(100.0)


def test_sigmoid_matches_reference_with_positive_labels(data):
  a, b, pidx, positives = data
  mask = np.asarray(losses.make_pos_mask(pidx, positives))
  t, bias = np.log(10.0), -10.0
  loss, m = losses.sigmoid_contrastive(a, b, t, bias)
  np.testing.assert_allclose(loss, np_reference(a, b, 10.0, bias, kind="sigmoid"), rtol=1e-5)
  loss_m, _ = losses.sigmoid_contrastive(a, b, t, bias, pos_mask=mask)
  ref_m = np_reference(a, b, 10.0, bias, pos_mask=mask, kind="sigmoid")
  np.testing.assert_allclose(loss_m, ref_m, rtol=1e-5)
  # Relabelling 3 pairs from -1 to +1 at bias -10 costs ~10 nats each: a big change.
  assert float(loss_m) - float(loss) > 3 * 5.0 / 7
  assert float(m["bias"]) == bias


def test_accuracy_metrics():
  # b_i = a_i except row 0's image matches row 1 better: a2b wrong for row 0 only.
  a = np.eye(4, dtype=np.float32)
  b = a.copy()
  b[1] = np.array([1, 1, 0, 0], np.float32) / np.sqrt(2)
  _, m = losses.softmax_contrastive(a, b, 0.0)
  # Row 0: <a0,b0>=1 > <a0,b1>=.71 ok; row 1: <a1,b1>=.71 < ... only b1 has a1 -> ok;
  # column 1: <a1,b1>=.71 < <a0,b1>=.71 tie -> not strictly better -> wrong.
  assert float(m["acc_a2b"]) == 1.0
  assert float(m["acc_b2a"]) == 0.75
  # Marking (0, 1) as a positive pair removes the competitor: column 1 becomes correct.
  pm = np.eye(4, dtype=bool)
  pm[0, 1] = True
  _, m2 = losses.softmax_contrastive(a, b, 0.0, pos_mask=pm)
  assert float(m2["acc_b2a"]) == 1.0


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("n,chunk,mask_form", [
    (13, 5, "none"), (13, 5, "dense"), (13, 5, "ids"),  # Ragged last block.
    (12, 4, "ids"), (6, 64, "dense")])                   # Even blocks; one block.
def test_chunked_equals_unchunked(n, chunk, kind, mask_form):
  rng = np.random.default_rng(n)
  d = 8
  a, b = jnp.asarray(_unit(rng, n, d)), jnp.asarray(_unit(rng, n, d))
  pidx = rng.integers(0, n // 2, size=n).astype(np.int32)  # Plenty of duplicates.
  positives = np.where(rng.random((n, 3)) < 0.5, rng.integers(0, n // 2, (n, 3)), -1)
  pos = {"none": None, "dense": losses.make_pos_mask(pidx, positives),
         "ids": (pidx, positives)}[mask_form]
  w = jnp.asarray(rng.uniform(0.0, 1.0, n).astype(np.float32))
  t, bias = jnp.float32(np.log(10.0)), jnp.float32(-5.0)

  if kind == "softmax":
    full = lambda a, b, t, bias: losses.softmax_contrastive(a, b, t, pos, w)
    chunked = lambda a, b, t, bias: losses.softmax_contrastive_chunked(
        a, b, t, pos, w, chunk_size=chunk)
  else:
    full = lambda a, b, t, bias: losses.sigmoid_contrastive(a, b, t, bias, pos, w)
    chunked = lambda a, b, t, bias: losses.sigmoid_contrastive_chunked(
        a, b, t, bias, pos, w, chunk_size=chunk)

  (l1, m1), g1 = _jit(jax.value_and_grad(full, argnums=(0, 1, 2, 3), has_aux=True))(
      a, b, t, bias)
  (l2, m2), g2 = _jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3), has_aux=True))(
      a, b, t, bias)
  np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-6)
  for x, y in zip(g1, g2):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  assert set(m1) == set(m2)
  for k in m1:
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(jnp.abs(g1[0]).sum()) > 0  # Gradients are not trivially zero.
  if mask_form != "none":
    dense = np.asarray(losses.make_pos_mask(pidx, positives))
    scale, bb = np.exp(float(t)), float(bias)
    if kind == "softmax":
      ref = np_reference(a, b, min(scale, 100.0), pos_mask=dense, weights=w)
    else:
      ref = np_reference(a, b, scale, bb, pos_mask=dense, weights=w, kind="sigmoid")
    np.testing.assert_allclose(l2, ref, rtol=1e-5)


def test_chunked_softmax_never_builds_full_logits():
  n, c, d = 64, 8, 4
  rng = np.random.default_rng(1)
  a, b = jnp.asarray(_unit(rng, n, d)), jnp.asarray(_unit(rng, n, d))
  f = lambda a, b: losses.softmax_contrastive_chunked(a, b, 2.0, chunk_size=c)[0]
  jaxpr = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(a, b))
  assert f"f32[{c},{n}]" in jaxpr
  assert f"f32[{n},{n}]" not in jaxpr
  dense = lambda a, b: losses.softmax_contrastive(a, b, 2.0)[0]
  assert f"f32[{n},{n}]" in str(jax.make_jaxpr(jax.grad(dense))(a, b))


def test_bad_inputs_raise():
  a = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="a and b"):
    losses.softmax_contrastive(a, np.zeros((5, 3), np.float32), 0.0)
  with pytest.raises(ValueError, match="pos_mask"):
    losses.sigmoid_contrastive(a, a, 0.0, 0.0, pos_mask=np.eye(3, dtype=bool))
  with pytest.raises(ValueError, match="weights"):
    losses.softmax_contrastive(a, a, 0.0, weights=np.ones(3))
  with pytest.raises(ValueError, match="chunk_size"):
    losses.softmax_contrastive_chunked(a, a, 0.0, chunk_size=0)
