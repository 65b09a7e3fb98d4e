"""Two gloo processes on CPU reproduce one process holding the whole batch (losses and gradients).

Each rank holds a slice of a fixed batch, scores its rows against the all-gathered columns with
``reduction="sum"`` divided by ``global_count / world_size``, back-propagates, and averages parameter
gradients over ranks as DDP does. The single-process reference is the official per-batch mean.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from irra_dist import distributed as D
from irra_dist.losses import cmpm_loss, irra_losses, itc_loss, sdm_loss

WORLD = 2
NUM_ROWS, IN_DIM, EMBED_DIM = 8, 6, 5
PIDS = torch.tensor([3, 3, 1, 4, 4, 4, 1, 0])  # repeated ids on both ranks, for SDM/CMPM positives
SPLITS = {"even": [4, 4], "uneven": [5, 3]}
LOSSES = ("sdm", "itc", "cmpm", "irra")


def make_problem() -> tuple[torch.nn.ModuleDict, torch.Tensor, torch.Tensor]:
    """Identical on every process: two Linear heads and their inputs, in float64."""
    torch.manual_seed(0)
    heads = torch.nn.ModuleDict({"image": torch.nn.Linear(IN_DIM, EMBED_DIM),
                                 "text": torch.nn.Linear(IN_DIM, EMBED_DIM)}).double()
    return heads, torch.randn(NUM_ROWS, IN_DIM, dtype=torch.float64), torch.randn(NUM_ROWS, IN_DIM,
                                                                                   dtype=torch.float64)


def loss_value(name: str, image: torch.Tensor, text: torch.Tensor, pids: torch.Tensor, cols: dict | None,
               normalizer: float | None) -> torch.Tensor:
    """One loss: the batch mean (normalizer None) or the local sum over the gathered columns / normalizer."""
    if name == "irra":
        outputs = {"image_feats": image, "text_feats": text}
        norms = None if normalizer is None else {"batch": normalizer}
        parts = irra_losses(outputs, {"pids": pids}, ("sdm", "itc", "cmpm"), columns=cols, normalizers=norms)
        return sum(parts.values())
    if normalizer is None:
        kwargs: dict = {}
    else:
        kwargs = {"image_cols": cols["image_feats"], "text_cols": cols["text_feats"], "reduction": "sum"}
        kwargs.update({"col_offset": cols["offset"]} if name == "itc" else {"col_pids": cols["pids"]})
    if name == "itc":
        value = itc_loss(image, text, **kwargs)
    else:
        value = (sdm_loss if name == "sdm" else cmpm_loss)(image, text, pids, **kwargs)
    return value if normalizer is None else value / normalizer


def reference() -> dict:
    """Single process, whole batch, mean reduction."""
    heads, x_img, x_txt = make_problem()
    out = {}
    for name in LOSSES:
        heads.zero_grad()
        loss = loss_value(name, heads["image"](x_img), heads["text"](x_txt), PIDS, None, None)
        loss.backward()
        out[name] = {"loss": loss.detach(), **{k: p.grad.clone() for k, p in heads.named_parameters()}}
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results: dict = {"world_size": D.world_size(), "rank": D.rank()}
        for split, sizes in SPLITS.items():
            begin = sum(sizes[:rank])
            rows = slice(begin, begin + sizes[rank])
            heads, x_img, x_txt = make_problem()
            for name in LOSSES:
                heads.zero_grad()
                image, text = heads["image"](x_img[rows]), heads["text"](x_txt[rows])
                # Even split: sizes known (no exchange); uneven: exchanged inside gather_columns.
                cols = D.gather_columns(image, text, PIDS[rows], sizes=sizes if split == "even" else None)
                count = D.all_reduce_sum(torch.tensor(float(image.shape[0]), dtype=torch.float64))
                loss = loss_value(name, image, text, PIDS[rows], cols, count.item() / D.world_size())
                loss.backward()
                for p in heads.parameters():  # what DDP does: average gradients over ranks
                    p.grad = D.all_reduce_sum(p.grad) / D.world_size()
                results[(split, name)] = {
                    "loss": D.all_reduce_sum(loss) / D.world_size(), "offset": cols["offset"],
                    "col_pids": cols["pids"], **{k: p.grad.clone() for k, p in heads.named_parameters()},
                }
        results["gather"] = _check_gather_with_grad(rank)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _check_gather_with_grad(rank: int) -> dict:
    """Uneven gather of rank-tagged rows; a rank-weighted loss whose gradients are known in closed form."""
    n = 3 if rank == 0 else 1
    x = torch.full((n, 2), float(rank + 1), dtype=torch.float64, requires_grad=True)
    gathered = D.all_gather_with_grad(x)
    weights = torch.arange(gathered.numel(), dtype=torch.float64).view_as(gathered)
    # Rank r's loss is (r + 1) * <weights, gathered>; the sum over ranks has gradient 3 * weights.
    ((rank + 1) * weights * gathered).sum().backward()
    try:
        D.all_gather_with_grad(x.detach(), sizes=[2, 2])  # wrong on both ranks
        size_error = ""
    except D.DistributedInputError as err:
        size_error = str(err)
    return {"gathered": gathered.detach(), "grad": x.grad, "size_error": size_error}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.dist
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("name", LOSSES)
def test_two_ranks_equal_one_process(rank_results: list[dict], split: str, name: str) -> None:
    want = reference()[name]
    for r, results in enumerate(rank_results):
        got = results[(split, name)]
        assert got["offset"] == sum(SPLITS[split][:r])
        assert torch.equal(got["col_pids"], PIDS)
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=f"rank {r} {key}")


@pytest.mark.dist
def test_all_gather_with_grad_uneven(rank_results: list[dict]) -> None:
    want_gathered = torch.tensor([[1.0, 1.0]] * 3 + [[2.0, 2.0]], dtype=torch.float64)
    weights = torch.arange(8, dtype=torch.float64).view(4, 2)
    for r, results in enumerate(rank_results):
        assert results["world_size"] == WORLD and results["rank"] == r
        gather = results["gather"]
        torch.testing.assert_close(gather["gathered"], want_gathered)
        rows = slice(0, 3) if r == 0 else slice(3, 4)
        torch.testing.assert_close(gather["grad"], 3 * weights[rows])
        assert f"sizes [2, 2] do not fit rank {r} of 2" in gather["size_error"]


def test_single_process_is_identity() -> None:
    assert not dist.is_initialized()
    x = torch.randn(3, 4, requires_grad=True)
    assert D.all_gather_with_grad(x) is x
    assert D.world_size() == 1 and D.rank() == 0 and D.gather_sizes(3) == [3]
    cols = D.gather_columns(x, x * 2, torch.arange(3))
    assert cols["offset"] == 0 and cols["image_feats"] is x and torch.equal(cols["pids"], torch.arange(3))
    total = D.all_reduce_sum(x)
    assert torch.equal(total, x.detach()) and total is not x and not total.requires_grad


def test_gather_columns_rejects_mismatched_inputs() -> None:
    with pytest.raises(D.DistributedInputError, match="share shape"):
        D.gather_columns(torch.zeros(3, 4), torch.zeros(3, 5), torch.arange(3))
    with pytest.raises(D.DistributedInputError, match="pids must be"):
        D.gather_columns(torch.zeros(3, 4), torch.zeros(3, 4), torch.arange(2))
