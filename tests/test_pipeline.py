"""Train/eval loaders over the shards: exact epochs, process-count-independent global batches, identity
sampling, resume, faults, and the official transforms checked against torchvision."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irra_dist.data import transforms as tr
from irra_dist.data.parsers import parse_dataset
from irra_dist.data.pipeline import TrainLoader, build_eval_loaders, derive_seed
from irra_dist.data.shards import MANIFEST_NAME, ShardError, build_shards
from irra_dist.synthetic.dataset import generate_synthetic_dataset
from irra_dist.tokenizer import MASK_ID, tokenize

SIZE = (64, 32)
# The default batch (mlm with mask_global_text): caption_ids ARE the masked captions, there is no mlm_ids.
KEYS = ("images", "caption_ids", "pids", "image_ids", "sample_index", "mlm_labels")


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("data")
    # Train pids with 2 to 6 captions: some below K = 4, so the identity sampler must draw with replacement.
    generate_synthetic_dataset(root / "CUHK-PEDES", num_train_ids=7, num_val_ids=1, num_test_ids=3,
                               images_per_id=(1, 3), captions_per_image=2, seed=5)
    return parse_dataset("CUHK-PEDES", root)


@pytest.fixture(scope="module")
def shard_dir(parsed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    build_shards(parsed, None, out, shard_size=3, workers=2)
    return out


def _loader(shard_dir: Path, **kwargs) -> TrainLoader:
    kwargs.setdefault("image_size", SIZE)
    return TrainLoader(shard_dir, **kwargs)


def _epoch(loader: TrainLoader, epoch: int = 1) -> list[dict[str, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _cat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _train_samples(parsed) -> list[tuple[int, int, str, str]]:
    return parsed.train_samples()


# --------------------------------------------------------------------------------------------------
# Transforms


def test_transforms_match_torchvision_bit_for_bit() -> None:
    from torchvision import transforms

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (150, 61, 3), dtype=np.uint8))
    mean, std = tr.CLIP_MEAN, tr.CLIP_STD
    official = transforms.Compose([
        transforms.Resize(SIZE), transforms.RandomHorizontalFlip(0.5), transforms.Pad(10),
        transforms.RandomCrop(SIZE), transforms.ToTensor(), transforms.Normalize(mean, std),
        transforms.RandomErasing(scale=(0.02, 0.4), value=mean)])
    no_aug = transforms.Compose([transforms.Resize(SIZE), transforms.RandomHorizontalFlip(0.5),
                                 transforms.ToTensor(), transforms.Normalize(mean, std)])
    test = transforms.Compose([transforms.Resize(SIZE), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])
    erased = 0
    for seed in range(120):
        torch.manual_seed(seed)
        expected = official(img)
        outside = torch.get_rng_state()
        got = tr.train_transform(img, seed, SIZE)
        assert torch.equal(got, expected), seed
        assert torch.equal(torch.get_rng_state(), outside)  # the caller's stream is untouched
        # Erased pixels hold the raw CLIP mean (not 0) in normalised space.
        erased += bool((got == torch.tensor(mean)[:, None, None]).all(0).any())
        torch.manual_seed(seed)
        expected = no_aug(img)
        got = tr.train_transform(img, seed, SIZE, image_aug=False)
        assert torch.equal(got, expected)
    assert 30 < erased < 90  # p = 0.5
    assert torch.equal(tr.test_transform(img, SIZE), test(img))


def test_derive_seed_separates_its_inputs() -> None:
    seeds = {derive_seed(1, e, p, s) for e in range(1, 4) for p in range(50) for s in range(3)}
    assert len(seeds) == 3 * 50 * 3 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(2, 2, 3)
    assert derive_seed(1, 2, 3) != derive_seed(1, 2, 3, 0) and derive_seed(1, 0) != derive_seed(1)


# --------------------------------------------------------------------------------------------------
# Training loader


def test_one_epoch_sees_every_caption_once_with_its_pid_and_text(parsed, shard_dir: Path) -> None:
    samples = _train_samples(parsed)
    loader = _loader(shard_dir, global_batch_size=5, mlm=False)
    assert loader.num_train_ids == parsed.num_train_ids and loader.num_samples == len(samples)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == -(-len(samples) // 5)
    assert [len(b["pids"]) for b in batches][-1] == len(samples) % 5 or len(samples) % 5 == 0
    got = _cat(batches)
    assert sorted(got["sample_index"].tolist()) == list(range(len(samples)))
    expected_ids = tokenize([samples[i][3] for i in got["sample_index"].tolist()])
    assert torch.equal(got["caption_ids"], expected_ids)
    assert got["pids"].tolist() == [samples[i][0] for i in got["sample_index"].tolist()]
    assert got["image_ids"].tolist() == [samples[i][1] for i in got["sample_index"].tolist()]
    assert got["images"].shape == (len(samples), 3, *SIZE) and got["images"].dtype == torch.float32
    assert set(got) == {"images", "caption_ids", "pids", "image_ids", "sample_index"}

    dropped = _loader(shard_dir, global_batch_size=5, mlm=False, drop_last=True)
    kept = _cat(_epoch(dropped))["sample_index"]
    assert len(dropped) == len(samples) // 5 and len(kept) == 5 * (len(samples) // 5)
    assert len(set(kept.tolist())) == len(kept)


def test_global_batches_are_identical_for_one_and_two_ranks(shard_dir: Path) -> None:
    # 7 does not divide the 30 samples: uneven rank slices (4 + 3) and a partial last batch (1 + 1).
    single = _loader(shard_dir, global_batch_size=7, num_workers=1)
    ranks = [_loader(shard_dir, global_batch_size=7, rank=r, world_size=2, num_workers=2) for r in range(2)]
    for epoch in (1, 2):
        one = _epoch(single, epoch)
        two = [_epoch(loader, epoch) for loader in ranks]
        assert len(one) == len(two[0]) == len(two[1]) == len(single)
        for k, batch in enumerate(one):
            n = len(batch["pids"])
            assert [len(two[r][k]["pids"]) for r in range(2)] == [n - n // 2, n // 2]
            for key in KEYS:
                assert torch.equal(batch[key], torch.cat([two[0][k][key], two[1][k][key]])), (epoch, k, key)


def test_uneven_last_batch_gives_empty_batches_to_the_extra_ranks(shard_dir: Path) -> None:
    full = _loader(shard_dir, global_batch_size=7, mlm=False, image_aug=False)
    n = full.num_samples
    assert n % 7 not in (0, 1)
    world = 7
    loaders = [_loader(shard_dir, global_batch_size=7, rank=r, world_size=world, mlm=False, image_aug=False)
               for r in range(world)]
    last = [_epoch(loader)[-1] for loader in loaders]
    sizes = [len(b["pids"]) for b in last]
    assert sizes == [1] * (n % 7) + [0] * (world - n % 7)
    assert last[-1]["images"].shape == (0, 3, *SIZE) and last[-1]["caption_ids"].shape == (0, 77)
    expected = _epoch(full)[-1]["sample_index"]
    assert torch.cat([b["sample_index"] for b in last]).tolist() == expected.tolist()


def test_epochs_differ_and_the_same_seed_repeats(shard_dir: Path) -> None:
    loader = _loader(shard_dir, global_batch_size=8, seed=3)
    first = _cat(_epoch(loader, 1))
    second = _cat(_epoch(loader, 2))
    assert first["sample_index"].tolist() != second["sample_index"].tolist()
    again = _cat(_epoch(_loader(shard_dir, global_batch_size=8, seed=3), 1))
    for key in KEYS:
        assert torch.equal(first[key], again[key]), key
    other = _cat(_epoch(_loader(shard_dir, global_batch_size=8, seed=4), 1))
    assert first["sample_index"].tolist() != other["sample_index"].tolist()
    assert [b.tolist() for b in loader.global_batches(2)] == [
        b.tolist() for b in _loader(shard_dir, global_batch_size=8, seed=3).global_batches(2)]


def test_masking_and_the_official_caption_aliasing(parsed, shard_dir: Path) -> None:
    samples = _train_samples(parsed)
    aliased = _cat(_epoch(_loader(shard_dir, global_batch_size=8, mask_global_text=True)))
    clean = _cat(_epoch(_loader(shard_dir, global_batch_size=8, mask_global_text=False)))
    assert set(aliased) == set(KEYS) and set(clean) == set(KEYS) | {"mlm_ids"}
    assert torch.equal(aliased["caption_ids"], clean["mlm_ids"])  # the masked captions, carried once
    for key in ("mlm_labels", "images", "sample_index"):
        assert torch.equal(aliased[key], clean[key])
    reference = tokenize([samples[i][3] for i in clean["sample_index"].tolist()])
    assert torch.equal(clean["caption_ids"], reference)
    labels, masked = clean["mlm_labels"], clean["mlm_ids"]
    selected = labels != 0
    assert selected.any(1).all()
    assert torch.equal(labels[selected], reference[selected])
    assert torch.equal(masked[~selected], reference[~selected])
    assert (masked[selected] == MASK_ID).float().mean() > 0.5


def test_masked_global_text_loss_equals_a_reference_pooled_from_the_masked_captions(shard_dir: Path) -> None:
    """The data owns the official aliasing: the losses of a mask_global_text batch through the model equal
    SDM, ID and MLM computed by hand with the global text feature pooled from the masked captions."""
    from irra_dist.losses import id_loss, irra_losses, mlm_loss, sdm_loss
    from irra_dist.model import build_irra

    loader = _loader(shard_dir, global_batch_size=8, mask_global_text=True)
    aliased = _epoch(loader)[0]
    clean = _epoch(_loader(shard_dir, global_batch_size=8, mask_global_text=False))[0]
    torch.manual_seed(0)
    model = build_irra(loader.num_train_ids, cmt_depth=1, embed_dim=32, image_size=SIZE, patch_size=16,
                       stride_size=16, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
                       text_heads=2, text_layers=1)  # the real 77 tokens and 49,408-word vocabulary
    names = ("sdm", "id", "mlm")
    with torch.no_grad():
        got = irra_losses(model(aliased), aliased, names)
        # Reference from the model's parts, the masked captions taken from the clean-mode batch.
        masked, pids = clean["mlm_ids"], clean["pids"]
        image_tokens = model.base_model.encode_image(clean["images"])
        text_tokens = model.base_model.encode_text(masked)
        image_feats = image_tokens[:, 0].float()
        text_feats = text_tokens[torch.arange(len(masked)), masked.argmax(-1)].float()  # EOT = largest id
        fused = model.cross_former(text_tokens, image_tokens)
        expected = {"sdm_loss": sdm_loss(image_feats, text_feats, pids, 50.0),
                    "id_loss": id_loss(model.classifier(image_feats), model.classifier(text_feats), pids),
                    "mlm_loss": mlm_loss(model.mlm_head(fused), clean["mlm_labels"])}
        clean_losses = irra_losses(model(clean), clean, names)
    assert list(got) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # The test can tell: pooled from the clean captions, SDM and ID differ (MLM reads masked ones in both).
    for key in ("sdm_loss", "id_loss"):
        assert not torch.allclose(clean_losses[key], got[key], rtol=1e-4, atol=0), key
    torch.testing.assert_close(clean_losses["mlm_loss"], got["mlm_loss"], rtol=1e-5, atol=1e-6)


def test_start_batch_resumes_mid_epoch(shard_dir: Path) -> None:
    loader = _loader(shard_dir, global_batch_size=4, num_workers=2)
    full = _epoch(loader, 2)
    loader.set_epoch(2)
    loader.start_batch = 3
    resumed = list(loader)
    assert len(resumed) == len(full) - 3
    for a, b in zip(resumed, full[3:]):
        for key in KEYS:
            assert torch.equal(a[key], b[key])
    assert loader.start_batch == 0 and len(list(loader)) == len(full)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_identity_sampler_gives_p_by_k_global_batches(parsed, shard_dir: Path, world_size: int) -> None:
    k, batch = 4, 9  # P = 2, so a global batch holds 8 samples (the 9th slot stays unused)
    samples = _train_samples(parsed)
    loaders = [_loader(shard_dir, global_batch_size=batch, sampler="identity", num_instances=k, rank=r,
                       world_size=world_size, mlm=False, image_aug=False) for r in range(world_size)]
    reference = _loader(shard_dir, global_batch_size=batch, sampler="identity", num_instances=k,
                        mlm=False).global_batches(1)
    per_rank = [_epoch(loader) for loader in loaders]
    assert len(reference) >= 3 and all(len(b) == len(reference) for b in per_rank)
    captions_of = {}
    for index, (pid, *_rest) in enumerate(samples):
        captions_of.setdefault(pid, []).append(index)
    small_pid_seen = False
    for g, expected in enumerate(reference):
        got = torch.cat([per_rank[r][g]["sample_index"] for r in range(world_size)])
        assert got.tolist() == expected.tolist()
        pids = [samples[i][0] for i in got.tolist()]
        assert len(pids) == 8
        # Two identities, each contributing K consecutive captions of its own.
        assert pids[:4] == [pids[0]] * 4 and pids[4:] == [pids[4]] * 4 and pids[0] != pids[4]
        for group in (got[:4].tolist(), got[4:].tolist()):
            own = captions_of[samples[group[0]][0]]
            assert set(group) <= set(own)
            if len(own) >= k:  # drawn with replacement only when a pid has fewer than K captions
                assert len(set(group)) == k
            small_pid_seen |= len(own) < k
    assert small_pid_seen
    assert loaders[0].global_batches(1)[0].tolist() != loaders[0].global_batches(2)[0].tolist()


def test_bad_loader_arguments_are_refused(shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rank"):
        _loader(shard_dir, global_batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_instances"):
        _loader(shard_dir, global_batch_size=3, sampler="identity", num_instances=4)
    with pytest.raises(ShardError, match="no manifest.json"):
        _loader(tmp_path, global_batch_size=4)


# --------------------------------------------------------------------------------------------------
# Faults


def _member_offsets(tar_path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(tar_path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


def test_corrupt_image_and_truncated_shard_are_skipped_and_counted(parsed, shard_dir: Path,
                                                                   tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    samples = _train_samples(parsed)
    records = parsed.splits["train"]
    shard_files = sorted(broken.glob("train-*.tar"))
    # A broken JPEG: overwrite record 1's image bytes in place (same size, so the size check passes).
    offset, size = _member_offsets(shard_files[0])["00000001.jpg"]
    with open(shard_files[0], "r+b") as f:
        f.seek(offset)
        f.write(bytes(size))
    # A truncated shard: cut the last shard inside its last record's image.
    last = shard_files[-1]
    members = _member_offsets(last)
    last_key = max(members)
    cut_record = int(last_key.split(".")[0])
    offset, _ = members[f"{cut_record:08d}.jpg"]
    with open(last, "r+b") as f:
        f.truncate(offset + 100)

    with pytest.raises(ShardError, match=f"{last.name} has .* bytes"):
        _loader(broken, global_batch_size=8)
    lost_records = {1, cut_record}
    lost = [i for i, s in enumerate(samples) if s[1] in {records[r].image_id for r in lost_records}]
    assert len(lost) == sum(len(records[r].captions) for r in lost_records)
    for workers in (0, 2):
        loader = _loader(broken, global_batch_size=8, num_workers=workers, verify=False)
        got = _cat(_epoch(loader))["sample_index"].tolist()
        assert loader.skipped == len(lost)
        assert sorted(got) == sorted(set(range(len(samples))) - set(lost))


def test_deleted_shard_or_edited_manifest_is_refused_before_training(shard_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    shutil.copytree(shard_dir, missing)
    (missing / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match="train-000001.tar is missing.*rebuild it with irra-build-shards"):
        _loader(missing, global_batch_size=4)
    with pytest.raises(ShardError, match="train-000001.tar is missing"):
        build_eval_loaders(missing, image_size=SIZE)

    edited = tmp_path / "edited"
    shutil.copytree(shard_dir, edited)
    manifest = json.loads((edited / MANIFEST_NAME).read_text())
    manifest["splits"]["train"]["shards"][0]["num_records"] -= 1
    (edited / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="train-index.json does not match the record counts"):
        _loader(edited, global_batch_size=4)


# --------------------------------------------------------------------------------------------------
# Pre-resized shards and evaluation


@pytest.mark.parametrize("fmt", ["png", "ppm"])
def test_pre_resized_shards_give_identical_training_batches(parsed, shard_dir: Path, tmp_path: Path,
                                                            fmt: str) -> None:
    resized = tmp_path / "resized"
    build_shards(parsed, None, resized, shard_size=3, workers=2, pre_resize=SIZE, pre_resize_format=fmt)
    a = _epoch(_loader(shard_dir, global_batch_size=8))[0]
    b = _epoch(_loader(resized, global_batch_size=8))[0]
    for key in KEYS:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(ShardError, match="pre-resized to 64x32"):
        TrainLoader(resized, global_batch_size=8, image_size=(96, 32))


@pytest.mark.parametrize("world_size", [1, 2])
def test_eval_loaders_cover_gallery_and_queries_in_order(parsed, shard_dir: Path, world_size: int) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    official = transforms.Compose([transforms.Resize(SIZE), transforms.ToTensor(),
                                   transforms.Normalize(tr.CLIP_MEAN, tr.CLIP_STD)])
    gallery, queries = [], []
    for rank in range(world_size):
        g, q = build_eval_loaders(shard_dir, "test", rank=rank, world_size=world_size, batch_size=3,
                                  image_size=SIZE, num_workers=rank)
        gallery += list(g)
        queries += list(q)
    g, q = _cat(gallery), _cat(queries)
    g_pids, g_paths = parsed.gallery("test")
    q_pids, q_captions = parsed.queries("test")
    assert g["index"].tolist() == list(range(len(g_pids))) and g["pids"].tolist() == g_pids
    expected = torch.stack([official(Image.open(p).convert("RGB")) for p in g_paths])
    assert torch.equal(g["images"], expected)
    assert q["index"].tolist() == list(range(len(q_pids))) and q["pids"].tolist() == q_pids
    assert torch.equal(q["caption_ids"], tokenize(q_captions))
