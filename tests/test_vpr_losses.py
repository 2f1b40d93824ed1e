"""Every loss and miner of serizba/salad (utils/losses.py) against pytorch-metric-learning itself.

The pml objects are built here with the official settings (get_loss / get_miner); the JAX side
is `salad_jax.losses.vpr_loss`. Mining and AvgNonZeroReducer are hard thresholds, so the batches
are built with every decision at least 2e-2 from its threshold (asserted: `decision_margins`),
and a mismatch is a bug, not rounding.
"""

import functools

import jax
import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances, losses, miners

import salad_jax.losses as L
from salad_jax.errors import UserError

LOSS_NAMES = [
  "SupConLoss",
  "CircleLoss",
  "MultiSimilarityLoss",
  "ContrastiveLoss",
  "Lifted",
  "FastAPLoss",
  "NTXentLoss",
  "TripletMarginLoss",
]
MINER_NAMES = ["TripletMarginMiner", "MultiSimilarityMiner", "PairMarginMiner"]
RTOL = 1e-4


def pml_loss(name):
  dot = distances.DotProductSimilarity
  return {
    "SupConLoss": lambda: losses.SupConLoss(temperature=0.07),
    "CircleLoss": lambda: losses.CircleLoss(m=0.4, gamma=80),
    "MultiSimilarityLoss": lambda: losses.MultiSimilarityLoss(
      alpha=1.0, beta=50, base=0.0, distance=dot()
    ),
    "ContrastiveLoss": lambda: losses.ContrastiveLoss(pos_margin=0, neg_margin=1),
    "Lifted": lambda: losses.GeneralizedLiftedStructureLoss(
      neg_margin=0, pos_margin=1, distance=dot()
    ),
    "FastAPLoss": lambda: losses.FastAPLoss(num_bins=30),
    "NTXentLoss": lambda: losses.NTXentLoss(temperature=0.07),
    "TripletMarginLoss": lambda: losses.TripletMarginLoss(
      margin=0.1, swap=False, smooth_loss=False, triplets_per_anchor="all"
    ),
  }[name]()


def pml_miner(name, margin=0.1):
  return {
    "TripletMarginMiner": lambda: miners.TripletMarginMiner(
      margin=margin, type_of_triplets="semihard"
    ),
    "MultiSimilarityMiner": lambda: miners.MultiSimilarityMiner(
      epsilon=margin, distance=distances.CosineSimilarity()
    ),
    "PairMarginMiner": lambda: miners.PairMarginMiner(
      pos_margin=0.7, neg_margin=0.3, distance=distances.DotProductSimilarity()
    ),
  }[name]()


def run_pml(desc, labels, loss, miner):
  """(loss, grad, mined index tuple as numpy, b_acc) as VPRModel.loss_function computes them."""
  e = torch.tensor(desc, requires_grad=True)
  lab = torch.tensor(labels)
  fn = pml_loss(loss)
  mined = None
  if miner is None:
    value, b_acc = fn(e, lab), 0.0
  else:
    mined = pml_miner(miner)(e, lab)
    value = fn(e, lab, mined)
    b_acc = 1.0 - len(set(mined[0].numpy().tolist())) / len(labels)
    mined = tuple(x.numpy() for x in mined)
  value.backward()
  return float(value.detach()), e.grad.numpy(), mined, b_acc


@functools.cache
def jitted(loss, miner):
  def f(desc, labels, valid):
    return L.vpr_loss(desc, labels, loss=loss, miner=miner, valid=valid)

  return jax.jit(jax.value_and_grad(f, has_aux=True))


def run_jax(desc, labels, loss, miner, valid=None):
  (value, aux), grad = jitted(loss, miner)(desc, labels, valid)
  return float(value), np.asarray(grad), aux


def as_masks(mined, n):
  """pml index tuple -> numpy bool masks (pairs: pos, neg; triplets: [N, N, N])."""
  if len(mined) == 3:
    t = np.zeros((n, n, n), bool)
    t[mined] = True
    assert t.sum() == len(mined[0])  # pml's triplets are unique
    return (t,)
  pos, neg = np.zeros((n, n), bool), np.zeros((n, n), bool)
  pos[mined[0], mined[1]] = True
  neg[mined[2], mined[3]] = True
  assert pos.sum() == len(mined[0]) and neg.sum() == len(mined[2])  # unique pairs
  return pos, neg


def rel(a, b):
  return abs(a - b) / max(abs(b), 1e-12)


def grad_rel(g, g_ref):
  return float(np.abs(g - g_ref).max() / max(np.abs(g_ref).max(), 1e-12))


# ------------------------------------------------------------------------------ test data
def batch(places, seed, k=4, group=4, dim=512, jitter=0.004):
  """`places` x `k` images whose similarities sit in narrow bands away from every threshold.

  Image i of place p in group G is, in an orthonormal basis of `dim` dims, w_g z + w_G g_G +
  w_p c_p + w_u u_i: a component shared by all images (0.05), one by the 4 places of a group
  (0.11 or 0.51), one by the place (0.06 or 0.2; in 30% of places half the images take -c_p,
  so an anchor's positives differ and the miners keep some of them), and its own. Squared
  weights jittered by about 2 x `jitter`; descriptors scaled by 0.5..2 (pml normalises) and
  shuffled. Cosine levels: same place 0.66..0.76 or 0.10..0.36, same group 0.16 or 0.56, other 0.05.
  """
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(places), k)
  n = places * k
  groups = places // group
  grp2 = rng.choice([0.11, 0.51], groups)
  plc2 = rng.choice([0.06, 0.2], places)
  sign = np.ones(n)
  flip = rng.random(places) < 0.3
  sign[np.repeat(flip, k) & (np.tile(np.arange(k), places) >= k // 2)] = -1
  gi = np.repeat(np.repeat(np.arange(groups), group), k)

  def jit():
    return 1 + jitter * rng.uniform(-1, 1, n)

  w_all = np.sqrt(0.05) * jit()
  w_grp = np.sqrt(grp2[gi]) * jit()
  w_plc = np.sqrt(plc2[labels]) * jit() * sign
  w_own = np.sqrt(1 - w_all**2 - w_grp**2 - w_plc**2)
  coef = np.zeros((n, 1 + groups + places + n))
  rows = np.arange(n)
  coef[:, 0] = w_all
  coef[rows, 1 + gi] = w_grp
  coef[rows, 1 + groups + labels] = w_plc
  coef[rows, 1 + groups + places + rows] = w_own
  basis, _ = np.linalg.qr(rng.standard_normal((dim, coef.shape[1])))
  desc = (coef @ basis.T) * rng.uniform(0.5, 2.0, (n, 1))
  perm = rng.permutation(n)
  return desc[perm].astype(np.float32), labels[perm] + 7000  # any integer ids


def decision_margins(desc, labels):
  """Float64 distance of every threshold decision (miners, AvgNonZeroReducer zeros, and the
  kinks where FastAP's / CircleLoss's gradients jump) to its threshold."""
  e = desc.astype(np.float64)
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  s = e @ e.T
  d = np.sqrt(np.maximum(2 - 2 * s, 0))
  n = len(labels)
  same = labels[:, None] == labels[None, :]
  cpos, cneg = same & ~np.eye(n, dtype=bool), ~same
  hardest_neg = np.where(cneg, s, -np.inf).max(1, keepdims=True)
  hardest_pos = np.where(cpos, s, np.inf).min(1, keepdims=True)
  m = d[:, None, :] - d[:, :, None]  # d_an - d_ap
  trip = cpos[:, :, None] & cneg[:, None, :]
  bins = (2 - 2 * s) / (4 / 30)
  return {
    "MultiSimilarityMiner": min(
      np.abs(s - 0.1 - hardest_neg)[cpos].min(), np.abs(s + 0.1 - hardest_pos)[cneg].min()
    ),
    "PairMarginMiner": min(np.abs(s - 0.7)[cpos].min(), np.abs(s - 0.3)[cneg].min()),
    "TripletMarginMiner/TripletMarginLoss": min(np.abs(m)[trip].min(), np.abs(m - 0.1)[trip].min()),
    "ContrastiveLoss": np.abs(1 - d)[cneg].min(),
    "CircleLoss": np.abs(s + 0.4)[cneg].min(),
    "FastAPLoss": (np.abs(bins - np.round(bins)) * 4 / 30)[cpos | cneg].min(),
  }


@functools.cache
def data(places, seed):
  desc, labels = batch(places, seed)
  margins = decision_margins(desc, labels)
  assert min(margins.values()) > 1e-2, margins
  return desc, labels


# ------------------------------------------------------------------------------ tests
def test_test_data_is_far_from_every_threshold_and_mines_partially():
  desc, labels = data(16, 0)
  for name, margin in decision_margins(desc, labels).items():
    assert margin > 2e-2, (name, margin)
  e = torch.tensor(desc)
  lab = torch.tensor(labels)
  n = len(labels)
  pos_all = 16 * 4 * 3
  for name in MINER_NAMES:
    masks = as_masks(pml_miner(name)(e, lab), n)
    if name == "TripletMarginMiner":
      assert 0 < masks[0].sum() < pos_all * 60
    else:
      assert 0 < masks[0].sum() < pos_all and 0 < masks[1].sum() < n * (n - 4)
      assert 0 < masks[0].any(1).sum() < n  # b_acc strictly between 0 and 1


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_loss_alone_matches_pml(loss):
  desc, labels = data(16, 0)
  want, grad_want, _, _ = run_pml(desc, labels, loss, None)
  got, grad, aux = run_jax(desc, labels, loss, None)
  assert want != 0.0
  assert rel(got, want) <= RTOL, (got, want)
  assert grad_rel(grad, grad_want) <= RTOL
  assert float(aux["b_acc"]) == 0.0
  assert int(aux["num_pos_pairs"]) == 16 * 4 * 3 and int(aux["num_neg_pairs"]) == 64 * 60


@pytest.mark.parametrize("loss", ["MultiSimilarityLoss", "TripletMarginLoss", "ContrastiveLoss"])
@pytest.mark.parametrize("miner", MINER_NAMES)
def test_each_miner_with_loss_matches_pml(miner, loss):
  desc, labels = data(16, 0)
  n = len(labels)
  want, grad_want, mined, b_acc = run_pml(desc, labels, loss, miner)
  got, grad, aux = run_jax(desc, labels, loss, miner)
  masks = as_masks(mined, n)
  if len(masks) == 1:
    np.testing.assert_array_equal(np.asarray(aux["triplet_mask"]), masks[0])
    assert int(aux["num_triplets"]) == masks[0].sum()
  else:
    np.testing.assert_array_equal(np.asarray(aux["pos_mask"]), masks[0])
    np.testing.assert_array_equal(np.asarray(aux["neg_mask"]), masks[1])
    assert int(aux["num_pos_pairs"]) == masks[0].sum()
    assert int(aux["num_neg_pairs"]) == masks[1].sum()
  assert abs(float(aux["b_acc"]) - b_acc) <= 1e-7 and 0 < b_acc < 1
  assert want != 0.0
  assert rel(got, want) <= RTOL, (got, want)
  assert grad_rel(grad, grad_want) <= RTOL


def test_the_other_losses_take_every_miner_like_pml():
  """Values only: every official miner in front of the remaining losses (one compilation)."""
  desc, labels = data(16, 0)
  combos = [
    (loss, miner)
    for loss in ["SupConLoss", "CircleLoss", "Lifted", "FastAPLoss", "NTXentLoss"]
    for miner in MINER_NAMES
  ]
  got = jax.jit(
    lambda d: [L.vpr_loss(d, labels, loss=loss, miner=miner)[0] for loss, miner in combos]
  )(desc)
  for (loss, miner), value in zip(combos, got):
    want = run_pml(desc, labels, loss, miner)[0]
    assert want != 0.0
    assert rel(float(value), want) <= RTOL, (loss, miner, float(value), want)


@pytest.mark.parametrize("loss", ["ContrastiveLoss", "NTXentLoss"])
def test_triplets_to_pairs_keep_pml_repeats_for_list_based_losses(loss):
  """pml turns triplets (a, p, n) into pair lists with (a, p) once per n: list-based losses
  count every copy. The deduplicated lists give a clearly different loss, so matching pml
  within 1e-6 shows the repeats are reproduced."""
  desc, labels = data(16, 0)
  e, lab = torch.tensor(desc), torch.tensor(labels)
  a, p, n = pml_miner("TripletMarginMiner")(e, lab)
  with_repeats = float(pml_loss(loss)(e, lab, (a, p, n)))
  ap = torch.unique(torch.stack([a, p]), dim=1)
  an = torch.unique(torch.stack([a, n]), dim=1)
  unique = float(pml_loss(loss)(e, lab, (ap[0], ap[1], an[0], an[1])))
  assert ap.shape[1] < len(a) and rel(unique, with_repeats) > 1e-4
  got = run_jax(desc, labels, loss, "TripletMarginMiner")[0]
  assert rel(got, with_repeats) <= 1e-6  # measured 1e-7; repeats dropped would be > 1e-4 off


@pytest.mark.parametrize(
  "loss,miner",
  [
    ("MultiSimilarityLoss", "MultiSimilarityMiner"),
    ("TripletMarginLoss", "TripletMarginMiner"),
    ("ContrastiveLoss", "PairMarginMiner"),
  ],
)
def test_sixty_places_by_four(loss, miner):
  """The training batch shape (N = 240: [N, N, N] triplet masks of 13.8 M entries)."""
  desc, labels = data(60, 1)
  want, grad_want, mined, b_acc = run_pml(desc, labels, loss, miner)
  got, grad, aux = run_jax(desc, labels, loss, miner)
  masks = as_masks(mined, 240)
  key = ["triplet_mask"] if len(masks) == 1 else ["pos_mask", "neg_mask"]
  for k, m in zip(key, masks):
    np.testing.assert_array_equal(np.asarray(aux[k]), m)
  assert abs(float(aux["b_acc"]) - b_acc) <= 1e-7
  assert rel(got, want) <= RTOL and grad_rel(grad, grad_want) <= RTOL


@pytest.mark.parametrize(
  "loss,miner",
  [
    ("MultiSimilarityLoss", "MultiSimilarityMiner"),
    ("ContrastiveLoss", "TripletMarginMiner"),
    ("FastAPLoss", "PairMarginMiner"),
    ("TripletMarginLoss", None),
  ],
)
def test_padding_gives_the_smaller_batch(loss, miner):
  """Padded entries (any content, even copies of real images with real labels) take no part."""
  desc, labels = data(16, 0)
  real = 48  # 12 places after the shuffle are not whole; keep the first 48 entries as they are
  pad_desc = desc.copy()
  pad_desc[real:] = desc[:16]
  pad_labels = labels.copy()
  pad_labels[real:] = labels[:16]
  valid = np.arange(64) < real
  want, grad_want, aux_want = run_jax(desc[:real], labels[:real], loss, miner)
  got, grad, aux = run_jax(pad_desc, pad_labels, loss, miner, valid)
  assert want != 0.0 and rel(got, want) <= 1e-6
  np.testing.assert_allclose(grad[:real], grad_want, atol=1e-6 * np.abs(grad_want).max())
  assert not grad[real:].any()
  for k in ("b_acc", "num_pos_pairs", "num_neg_pairs", "num_triplets"):
    assert abs(float(aux[k]) - float(aux_want[k])) <= 1e-7, k
  pml_small = run_pml(desc[:real], labels[:real], loss, miner)[0]
  assert rel(got, pml_small) <= RTOL


def test_compiles_once_per_shape():
  desc, labels = data(16, 0)
  traces = []

  @jax.jit
  def f(d, lab):
    traces.append(1)
    return L.vpr_loss(d, lab, loss="TripletMarginLoss", miner="TripletMarginMiner")[0]

  f(desc, labels)
  f(desc[::-1].copy(), labels)
  assert len(traces) == 1


def test_names():
  desc, labels = data(16, 0)
  with pytest.raises(UserError, match="MultiSimilarityLoss") as err:
    L.vpr_loss(desc, labels, loss="MSLoss")
  assert all(name in str(err.value) for name in LOSS_NAMES)
  with pytest.raises(UserError, match="PairMarginMiner"):
    L.vpr_loss(desc, labels, miner="BatchHardMiner")
  # the official option cannot run on pml 2.x: the class is gone (removed in pml 2.0.0)
  assert not hasattr(losses, "CentroidTripletLoss")
  with pytest.raises(UserError, match="TripletMarginLoss"):
    L.vpr_loss(desc, labels, loss="CentroidTripletLoss")


def test_default_is_the_multi_similarity_objective():
  desc, labels = data(16, 0)
  (got, aux), (want, aux_want) = jax.jit(
    lambda d: (L.vpr_loss(d, labels), L.multi_similarity_loss(d, labels))
  )(desc)
  assert abs(float(got) - float(want)) <= 1e-7
  np.testing.assert_array_equal(np.asarray(aux["pos_mask"]), np.asarray(aux_want["pos_mask"]))
  assert float(aux["b_acc"]) == float(aux_want["b_acc"])


def test_nothing_to_mine_gives_zero_like_pml():
  """One place only: no negatives anywhere; each loss returns pml's value (0 or not)."""
  desc = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
  labels = np.zeros(8, int)
  got = jax.jit(lambda d: [L.vpr_loss(d, labels, loss=loss, miner=None)[0] for loss in LOSS_NAMES])(
    desc
  )
  for loss, value in zip(LOSS_NAMES, got):
    want = run_pml(desc, labels, loss, None)[0]
    assert abs(float(value) - want) <= RTOL * max(abs(want), 1.0), (loss, float(value), want)
  grad = jax.grad(lambda d: L.vpr_loss(d, labels, loss="CircleLoss", miner=None)[0])(desc)
  assert np.isfinite(np.asarray(grad)).all()
