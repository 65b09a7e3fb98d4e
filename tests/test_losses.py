"""Losses against naive references written here from the formulas of IRRA_SPEC section 2."""

from __future__ import annotations

import math

import pytest
import torch

from irra_dist.losses import (
    LossInputError,
    cmpm_loss,
    id_loss,
    irra_accuracies,
    irra_losses,
    itc_loss,
    mlm_loss,
    sdm_loss,
)

EPS = 1e-8


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads only add contention on the shared CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(b: int = 8, d: int = 16, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, d, generator=g, dtype=dtype)
    txt = torch.randn(b, d, generator=g, dtype=dtype) + 0.5 * img  # correlated pairs
    pids = torch.tensor([3, 1, 3, 7, 1, 3, 9, 7, 2, 2, 5, 9, 4, 4, 6, 0][:b])  # repeated ids
    return img, txt, pids


# ------------------------------------------------------------------------------------------------
# Naive references: explicit loops over rows and columns, float64.


def _unit(v):
    return v / math.sqrt(sum(float(x) ** 2 for x in v))


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [x / z for x in e]


def _kl_row(logits, target):
    p = _softmax(logits)
    return sum(pj * (math.log(pj) - math.log(qj + EPS)) for pj, qj in zip(p, target))


def naive_matching(rows_a, rows_b, row_pids, cols_a, cols_b, col_pids, kind, scale=50.0):
    """Per-row SDM / CMPM (both directions) of rows against columns.

    rows_a/cols_a: images, rows_b/cols_b: texts. Returns a list of per-row losses.
    """
    out = []
    for i in range(len(rows_a)):
        pos = [1.0 if int(col_pids[j]) == int(row_pids[i]) else 0.0 for j in range(len(cols_a))]
        if kind == "sdm":
            target = [y / sum(pos) for y in pos]
            i2t = [scale * _dot(_unit(rows_a[i]), _unit(c)) for c in cols_b]
            t2i = [scale * _dot(_unit(rows_b[i]), _unit(c)) for c in cols_a]
        else:  # cmpm: unnormalised row, normalised column, L2-normalised labels
            target = [y / math.sqrt(sum(pos)) for y in pos]
            i2t = [_dot(rows_a[i], _unit(c)) for c in cols_b]
            t2i = [_dot(rows_b[i], _unit(c)) for c in cols_a]
        out.append(_kl_row(i2t, target) + _kl_row(t2i, target))
    return out


def naive_itc(rows_a, rows_b, cols_a, cols_b, offset, scale=50.0):
    out = []
    for i in range(len(rows_a)):
        i2t = [scale * _dot(_unit(rows_a[i]), _unit(c)) for c in cols_b]
        t2i = [scale * _dot(_unit(rows_b[i]), _unit(c)) for c in cols_a]
        ce_i = -math.log(_softmax(i2t)[offset + i])
        ce_t = -math.log(_softmax(t2i)[offset + i])
        out.append((ce_i + ce_t) / 2)
    return out


def naive_id(image_logits, text_logits, pids):
    """Per-row (CE_image + CE_text) / 2."""
    return [(a + b) / 2 for a, b in zip(naive_ce(image_logits, pids), naive_ce(text_logits, pids))]


def naive_ce(logits, targets, ignore=None):
    values = []
    for row, t in zip(logits, targets):
        if ignore is not None and int(t) == ignore:
            continue
        values.append(-math.log(_softmax([float(x) for x in row])[int(t)]))
    return values


def official_sdm_matrix(img, txt, pids, scale=50.0):
    """The official formula in plain matrix code: q = Y / Y.sum(dim=1) broadcast over COLUMNS."""
    b = pids.numel()
    y = (pids.reshape(b, 1) - pids.reshape(b, 1).t() == 0).to(img.dtype)
    i_n = img / img.norm(dim=1, keepdim=True)
    t_n = txt / txt.norm(dim=1, keepdim=True)
    t2i = scale * t_n @ i_n.t()
    i2t = t2i.t()
    q = y / y.sum(dim=1)
    li = torch.softmax(i2t, 1) * (torch.log_softmax(i2t, 1) - torch.log(q + EPS))
    lt = torch.softmax(t2i, 1) * (torch.log_softmax(t2i, 1) - torch.log(q + EPS))
    return li.sum(1).mean() + lt.sum(1).mean()


# ------------------------------------------------------------------------------------------------


def test_sdm_matches_naive_and_official_matrix_form():
    img, txt, pids = _data()
    expected = naive_matching(img, txt, pids, img, txt, pids, "sdm")
    got = sdm_loss(img, txt, pids)
    assert got.item() == pytest.approx(sum(expected) / len(expected), rel=1e-9)
    assert got.item() == pytest.approx(official_sdm_matrix(img, txt, pids).item(), rel=1e-9)
    assert sdm_loss(img, txt, pids, 10.0).item() == pytest.approx(
        sum(naive_matching(img, txt, pids, img, txt, pids, "sdm", 10.0)) / 8, rel=1e-9)


def test_sdm_float32_input_and_tensor_scale():
    img, txt, pids = _data(dtype=torch.float32)
    expected = sum(naive_matching(img.double(), txt.double(), pids, img.double(), txt.double(), pids, "sdm"))
    got = sdm_loss(img.half(), txt.half(), pids, torch.tensor(50.0))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected / 8, rel=2e-2)  # half inputs
    assert sdm_loss(img, txt, pids).item() == pytest.approx(expected / 8, rel=1e-4)


def test_cmpm_matches_naive():
    img, txt, pids = _data(seed=1)
    expected = naive_matching(img, txt, pids, img, txt, pids, "cmpm")
    assert cmpm_loss(img, txt, pids).item() == pytest.approx(sum(expected) / 8, rel=1e-9)


def test_itc_matches_naive():
    img, txt, _ = _data(seed=2)
    expected = naive_itc(img, txt, img, txt, 0)
    assert itc_loss(img, txt).item() == pytest.approx(sum(expected) / 8, rel=1e-9)
    assert itc_loss(img, txt, 20.0).item() == pytest.approx(sum(naive_itc(img, txt, img, txt, 0, 20.0)) / 8,
                                                            rel=1e-9)


def test_id_and_mlm_match_naive():
    g = torch.Generator().manual_seed(3)
    img_logits = torch.randn(6, 5, generator=g, dtype=torch.float64)
    txt_logits = torch.randn(6, 5, generator=g, dtype=torch.float64)
    pids = torch.tensor([0, 4, 4, 2, 1, 0])
    expected = naive_id(img_logits, txt_logits, pids)
    assert id_loss(img_logits, txt_logits, pids).item() == pytest.approx(sum(expected) / 6, rel=1e-9)
    assert id_loss(img_logits, txt_logits, pids, "sum").item() == pytest.approx(sum(expected), rel=1e-9)

    scores = torch.randn(20, 11, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 0, 0, 10, 1, 0, 0, 0, 7, 0, 0, 2, 0, 0, 0, 0, 5, 0, 0])
    terms = naive_ce(scores, labels, ignore=0)
    assert len(terms) == 6
    assert mlm_loss(scores, labels).item() == pytest.approx(sum(terms) / 6, rel=1e-9)
    assert mlm_loss(scores, labels, "sum").item() == pytest.approx(sum(terms), rel=1e-9)
    # [B, L, V] layout gives the same value.
    assert mlm_loss(scores.reshape(4, 5, 11), labels.reshape(4, 5)).item() == pytest.approx(sum(terms) / 6)


def test_id_loss_leaves_out_rows_whose_pid_is_not_a_class():
    """A mixture's rows from a set without identities have pids past the C classes: only the others count."""
    g = torch.Generator().manual_seed(4)
    img_logits = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    txt_logits = torch.randn(7, 5, generator=g, dtype=torch.float64)
    pids = torch.tensor([0, 7, 4, 5, 2, 9, 1])  # 7, 5, 9: not classes of a 5-class classifier
    keep = torch.tensor([0, 2, 4, 6])
    expected = naive_id(img_logits[keep], txt_logits[keep], pids[keep])
    got = id_loss(img_logits, txt_logits, pids)
    assert got.item() == pytest.approx(sum(expected) / 4, rel=1e-9)
    assert id_loss(img_logits, txt_logits, pids, "sum").item() == pytest.approx(sum(expected), rel=1e-9)
    got.backward()
    assert img_logits.grad[torch.tensor([1, 3, 5])].abs().sum() == 0  # left-out rows get no gradient
    # No classified row: zero, not NaN (a non-finite loss would skip the step).
    none = id_loss(img_logits, txt_logits, torch.tensor([5, 6, 7, 8, 9, 10, 11]))
    assert none.item() == 0.0
    # Normalised by the global count of classified rows, as the trainer passes it.
    out = {"image_logits": img_logits, "text_logits": txt_logits}
    got = irra_losses(out, {"pids": pids}, ("id",), normalizers={"batch": 7, "id": 4})["id_loss"]
    assert got.item() == pytest.approx(sum(expected) / 4, rel=1e-9)
    acc = irra_accuracies(out, {"pids": pids})
    hits = (img_logits[keep].argmax(dim=1) == pids[keep]).double().mean().item()
    assert acc["img_acc"].item() == pytest.approx(hits)
    # Two ranks holding rows 0-3 and 4-6 (2 and 2 classified rows): each divides its sum by the global count
    # over the world size, as the trainer does, and DDP averages the two: the one-process loss.
    norm = {"batch": 7 / 2, "id": 4 / 2}
    halves = [irra_losses({k: v[rows] for k, v in out.items()}, {"pids": pids[rows]}, ("id",),
                          normalizers=norm)["id_loss"] for rows in (slice(0, 4), slice(4, 7))]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(sum(expected) / 4, rel=1e-9)


@pytest.mark.parametrize("fn", ["sdm", "cmpm", "itc"])
def test_sum_over_rows_is_b_times_mean(fn):
    img, txt, pids = _data(seed=4)
    call = {"sdm": lambda r: sdm_loss(img, txt, pids, reduction=r),
            "cmpm": lambda r: cmpm_loss(img, txt, pids, reduction=r),
            "itc": lambda r: itc_loss(img, txt, reduction=r)}[fn]
    assert (call("sum") / 8).item() == pytest.approx(call("mean").item(), rel=1e-12)
    with pytest.raises(LossInputError, match="reduction"):
        call("max")


@pytest.mark.parametrize("kind", ["sdm", "cmpm"])
def test_columns_permutation_gives_the_same_loss(kind):
    img, txt, pids = _data(seed=5)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    fn = sdm_loss if kind == "sdm" else cmpm_loss
    base = fn(img, txt, pids)
    permuted = fn(img, txt, pids, image_cols=img[perm], text_cols=txt[perm], col_pids=pids[perm])
    assert permuted.item() == pytest.approx(base.item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["sdm", "cmpm", "itc"])
def test_sharded_rows_against_global_columns(kind):
    """3 'ranks' x 4 rows against the 12 gathered columns sum to the single-process loss on 12 rows."""
    img, txt, pids = _data(b=12, seed=6)
    scale = 50.0
    total = 0.0
    for rank in range(3):
        sl = slice(4 * rank, 4 * rank + 4)
        if kind == "itc":
            part = itc_loss(img[sl], txt[sl], scale, image_cols=img, text_cols=txt, col_offset=4 * rank,
                            reduction="sum")
            naive = naive_itc(img[sl], txt[sl], img, txt, 4 * rank, scale)
        else:
            fn = sdm_loss if kind == "sdm" else cmpm_loss
            extra = {"logit_scale": scale} if kind == "sdm" else {}
            part = fn(img[sl], txt[sl], pids[sl], image_cols=img, text_cols=txt, col_pids=pids,
                      reduction="sum", **extra)
            naive = naive_matching(img[sl], txt[sl], pids[sl], img, txt, pids, kind, scale)
        assert part.item() == pytest.approx(sum(naive), rel=1e-9)
        total = total + part
    single = {"sdm": lambda: sdm_loss(img, txt, pids), "cmpm": lambda: cmpm_loss(img, txt, pids),
              "itc": lambda: itc_loss(img, txt)}[kind]()
    assert (total / 12).item() == pytest.approx(single.item(), rel=1e-12)


def test_superset_columns_match_naive_rectangular_formula():
    img, txt, pids = _data(b=8, seed=7)
    extra_img, extra_txt, _ = _data(b=5, seed=8)
    extra_pids = torch.tensor([3, 11, 12, 1, 13])  # two share ids with the rows
    cimg, ctxt = torch.cat([extra_img, img]), torch.cat([extra_txt, txt])
    cpids = torch.cat([extra_pids, pids])
    got = sdm_loss(img, txt, pids, image_cols=cimg, text_cols=ctxt, col_pids=cpids)
    expected = naive_matching(img, txt, pids, cimg, ctxt, cpids, "sdm")
    assert got.item() == pytest.approx(sum(expected) / 8, rel=1e-9)
    got_itc = itc_loss(img, txt, image_cols=cimg, text_cols=ctxt, col_offset=5)
    assert got_itc.item() == pytest.approx(sum(naive_itc(img, txt, cimg, ctxt, 5)) / 8, rel=1e-9)


def test_sdm_gradcheck_float64():
    img, txt, pids = _data(b=6, d=5, seed=9)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: sdm_loss(a, b, pids, 5.0), (img, txt))
    cols = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    cpids = torch.cat([pids, torch.tensor([40, 41, 3])])
    assert torch.autograd.gradcheck(
        lambda a, b, c: sdm_loss(a, b, pids, 5.0, image_cols=torch.cat([a, c[:3]]),
                                 text_cols=torch.cat([b, c[3:6]]), col_pids=cpids), (img, txt, cols))


def test_bad_column_inputs():
    img, txt, pids = _data()
    with pytest.raises(LossInputError, match="both"):
        sdm_loss(img, txt, pids, image_cols=img)
    with pytest.raises(LossInputError, match="col_pids"):
        sdm_loss(img, txt, pids, image_cols=img, text_cols=txt)
    with pytest.raises(LossInputError, match="col_offset"):
        itc_loss(img, txt, image_cols=img, text_cols=txt, col_offset=3)


# ------------------------------------------------------------------------------------------------
# irra_losses / irra_accuracies


def _outputs(seed: int = 10, with_scale: bool = True):
    img, txt, pids = _data(b=8, d=16, seed=seed)
    g = torch.Generator().manual_seed(seed)
    out = {"image_feats": img, "text_feats": txt,
           "image_logits": torch.randn(8, 10, generator=g, dtype=torch.float64),
           "text_logits": torch.randn(8, 10, generator=g, dtype=torch.float64),
           "mlm_logits": torch.randn(13, 30, generator=g, dtype=torch.float64),
           "mlm_labels": torch.tensor([5, 0, 7, 29, 0, 1, 3, 0, 0, 12, 4, 0, 8])}
    if with_scale:
        out["logit_scale"] = torch.tensor(25.0)
    return out, {"pids": pids}


def test_irra_losses_weights_and_scale():
    out, batch = _outputs()
    pids, img, txt = batch["pids"], out["image_feats"], out["text_feats"]
    weights = {"sdm": 2.0, "mlm": 0.5, "itc": 3.0}
    got = irra_losses(out, batch, ("sdm", "itc", "cmpm", "id", "mlm"), weights=weights)
    assert list(got) == ["sdm_loss", "itc_loss", "cmpm_loss", "id_loss", "mlm_loss"]
    sdm = sum(naive_matching(img, txt, pids, img, txt, pids, "sdm", 25.0)) / 8
    itc = sum(naive_itc(img, txt, img, txt, 0, 25.0)) / 8
    cmpm = sum(naive_matching(img, txt, pids, img, txt, pids, "cmpm")) / 8
    idl = sum(naive_id(out["image_logits"], out["text_logits"], pids)) / 8
    mlm_terms = naive_ce(out["mlm_logits"], out["mlm_labels"], ignore=0)
    mlm = sum(mlm_terms) / len(mlm_terms)
    assert got["sdm_loss"].item() == pytest.approx(2.0 * sdm, rel=1e-9)
    assert got["itc_loss"].item() == pytest.approx(3.0 * itc, rel=1e-9)
    assert got["cmpm_loss"].item() == pytest.approx(cmpm, rel=1e-9)
    assert got["id_loss"].item() == pytest.approx(idl, rel=1e-9)
    assert got["mlm_loss"].item() == pytest.approx(0.5 * mlm, rel=1e-9)
    # Without logit_scale in the outputs, 1 / temperature is used.
    out_ns, _ = _outputs(with_scale=False)
    got_t = irra_losses(out_ns, batch, ("sdm",), temperature=0.04)
    assert got_t["sdm_loss"].item() == pytest.approx(sdm, rel=1e-9)
    assert set(irra_losses(out, batch)) == {"sdm_loss", "id_loss", "mlm_loss"}


def test_irra_losses_normalizers_and_columns():
    out, batch = _outputs(seed=11)
    pids, img, txt = batch["pids"], out["image_feats"], out["text_feats"]
    extra_img, extra_txt, _ = _data(b=4, d=16, seed=12)
    cols = {"image_feats": torch.cat([extra_img, img]), "text_feats": torch.cat([extra_txt, txt]),
            "pids": torch.cat([torch.tensor([3, 20, 21, 22]), pids]), "offset": 4}
    got = irra_losses(out, batch, ("sdm", "itc", "id", "mlm"), weights={"id": 2.0}, columns=cols,
                      normalizers={"batch": 12, "mlm": torch.tensor(20.0)})
    sdm = sum(naive_matching(img, txt, pids, cols["image_feats"], cols["text_feats"], cols["pids"], "sdm",
                             25.0))
    itc = sum(naive_itc(img, txt, cols["image_feats"], cols["text_feats"], 4, 25.0))
    idl = sum(naive_id(out["image_logits"], out["text_logits"], pids))
    mlm = sum(naive_ce(out["mlm_logits"], out["mlm_labels"], ignore=0))
    assert got["sdm_loss"].item() == pytest.approx(sdm / 12, rel=1e-9)
    assert got["itc_loss"].item() == pytest.approx(itc / 12, rel=1e-9)
    assert got["id_loss"].item() == pytest.approx(2.0 * idl / 12, rel=1e-9)
    assert got["mlm_loss"].item() == pytest.approx(mlm / 20, rel=1e-9)


def test_irra_losses_errors():
    out, batch = _outputs()
    with pytest.raises(LossInputError, match="loss_names"):
        irra_losses(out, batch, ("sdm", "triplet"))
    with pytest.raises(LossInputError, match="weights"):
        irra_losses(out, batch, weights={"sdmm": 1.0})
    with pytest.raises(LossInputError, match="normalizers"):
        irra_losses(out, batch, normalizers={"batch": 8})
    del out["image_logits"]
    with pytest.raises(LossInputError, match="image_logits"):
        irra_losses(out, batch, ("id",))


def test_irra_accuracies_hand_computed():
    outputs = {
        "image_logits": torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], requires_grad=True),
        "text_logits": torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]),
        "mlm_logits": torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
        "mlm_labels": torch.tensor([1, 0, 1, 2]),  # argmax 1, -, 2, 1: one hit of three labelled
    }
    batch = {"pids": torch.tensor([1, 0, 0, 0])}  # image argmax 1,0,1,0 -> 3/4; text 0,0,1,0 -> 2/4
    acc = irra_accuracies(outputs, batch)
    assert acc["img_acc"].item() == pytest.approx(0.75)
    assert acc["txt_acc"].item() == pytest.approx(0.5)
    assert acc["mlm_acc"].item() == pytest.approx(1 / 3)
    assert not any(v.requires_grad for v in acc.values())
    assert set(irra_accuracies({"mlm_logits": outputs["mlm_logits"], "mlm_labels": outputs["mlm_labels"]},
                               batch)) == {"mlm_acc"}


def test_empty_local_batch_gives_finite_zero_sums():
    """A rank can hold no rows in the last global batch; with normalizers its losses must be 0, not NaN."""
    img, txt, pids = _data(b=6, seed=13)
    cols = {"image_feats": img, "text_feats": txt, "pids": pids, "offset": 6}
    none = torch.zeros(0, 4, dtype=img.dtype)
    empty = {"image_feats": img[:0], "text_feats": txt[:0], "image_logits": none, "text_logits": none,
             "mlm_logits": torch.zeros(0, 9, dtype=img.dtype), "mlm_labels": torch.zeros(0, dtype=torch.long)}
    got = irra_losses(empty, {"pids": pids[:0]}, ("sdm", "itc", "cmpm", "id", "mlm"), columns=cols,
                      normalizers={"batch": 6.0, "mlm": 4.0})
    assert all(v.item() == 0.0 for v in got.values())
