"""World-size independence: 2-rank gloo runs (torchrun / mp.spawn on 127.0.0.1) equal 1-rank runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from sampling_utils import (
    FakeInception,
    crops,
    free_port,
    gather_worker,
    photos,
    random_inception_weights,
    tiny_checkpoint,
    torchrun,
)

import jit_fast.sampling.generate as sample_mod
from jit_fast.sampling import fid


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pth")


def load_npz(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def test_chunks_cover_the_index_space_once():
    for n, b, world in [(40, 6, 2), (50000, 256, 8), (7, 10, 3), (13, 1, 4)]:
        chunks = [c for r in range(world) for c in sample_mod.rank_chunks(n, b, r, world)]
        seen = sorted(i for _, s, e in chunks for i in range(s, e))
        assert seen == list(range(n))
    labels = sample_mod.class_labels(0, 50000, 1000)
    assert torch.equal(torch.bincount(labels), torch.full((1000,), 50))  # class-balanced
    assert labels[1234] == 234


def test_two_ranks_generate_the_same_images_as_one(ckpt, tmp_path):
    args = ["--ckpt", str(ckpt), "--num-images", "40", "--batch-size", "6", "--steps", "3", "--cfg", "2.5",
            "--no-metrics"]
    r = torchrun(2, args + ["--out", str(tmp_path / "w2")])
    assert r.returncode == 0, r.stderr[-3000:]
    r1 = torchrun(1, args + ["--out", str(tmp_path / "w1")])  # same intra-op thread count (1) as each rank
    assert r1.returncode == 0, r1.stderr[-3000:]
    two, one = load_npz(tmp_path / "w2" / "samples.npz"), load_npz(tmp_path / "w1" / "samples.npz")
    assert np.array_equal(one["labels"], np.arange(40) % 10)
    for i in range(40):  # image by image
        assert np.array_equal(two["images"][i], one["images"][i]), f"image {i} differs"
    assert json.loads((tmp_path / "w2" / "metrics.json").read_text())["timing"]["world_size"] == 2
    assert r.stdout.count("NFE per image: 5") == 1  # printed by rank 0 only

    # another batch size regroups the images: equal up to the float rounding of batched matmuls
    assert sample_mod.main(args + ["--batch-size", "8", "--out", str(tmp_path / "b8")]) == 0
    b8 = load_npz(tmp_path / "b8" / "samples.npz")["images"].astype(int)
    diff = np.abs(b8 - one["images"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_features_and_folder_stats_gathered_across_ranks(tmp_path):
    images = crops(photos(), 23, 24, seed=4, augment=True)
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, im in enumerate(images[:11]):
        Image.fromarray(im).save(folder / f"{i:04d}.png")
    (tmp_path / "w2").mkdir()
    mp.spawn(gather_worker, args=(2, free_port(), images, 4, str(folder), str(tmp_path / "w2")), nprocs=2)
    two = torch.load(tmp_path / "w2" / "gathered.pt", weights_only=False)

    ext = FakeInception()
    acc = fid.FeatureAccumulator(ext, 5)
    for _, st, en in sample_mod.chunk_ranges(23, 4):
        acc.add(images[st:en], st)
    one = acc.gather()
    stats = fid.reference_stats(folder, lambda: fid.FeatureAccumulator(ext, 5), "w", cache_dir=tmp_path / "c1")
    for k in ("index", fid.POOL, fid.LOGITS):
        assert torch.equal(two["feats"][k], one[k])
    # the folder is split into other batches on 2 ranks: equal up to batched-matmul rounding (CPU-dependent)
    np.testing.assert_allclose(two["stats"]["mu"], stats["mu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["stats"]["sigma"], stats["sigma"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_rank_metrics_equal_one_rank_and_torch_fidelity(ckpt, tmp_path):
    """Real (random-weight) Inception end to end: FID/IS at world 2 == world 1 == calculate_metrics on --png."""
    import torch_fidelity

    weights = random_inception_weights(tmp_path / "inception.pth")
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, im in enumerate(crops(photos(), 10, 48, seed=9, augment=True)):
        Image.fromarray(im).save(ref / f"{i:04d}.png")
    args = ["--ckpt", str(ckpt), "--num-images", "12", "--batch-size", "4", "--steps", "2", "--png",
            "--inception-weights", str(weights), "--fid-ref", str(ref), "--fid-batch-size", "4",
            "--fid-cache", str(tmp_path / "cache")]
    for world in (2, 1):
        r = torchrun(world, args + ["--out", str(tmp_path / f"w{world}")])
        assert r.returncode == 0, r.stderr[-3000:]
    m2 = json.loads((tmp_path / "w2" / "metrics.json").read_text())["metrics"]
    m1 = json.loads((tmp_path / "w1" / "metrics.json").read_text())["metrics"]
    assert m1 == m2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank: CPU convolutions may round differently per thread count
    try:
        theirs = torch_fidelity.calculate_metrics(
            input1=str(tmp_path / "w1" / "images"), input2=str(ref), cuda=False, isc=True, fid=True, verbose=False,
            cache=False, save_cpu_ram=True, batch_size=4, feature_extractor_weights_path=str(weights))
    finally:
        torch.set_num_threads(threads)
    assert m1["fid"] == pytest.approx(theirs["frechet_inception_distance"], abs=1e-6, rel=0)
    assert m1["inception_score_mean"] == pytest.approx(theirs["inception_score_mean"], abs=1e-6, rel=0)
