"""In-memory FID/IS vs torch-fidelity on PNG folders; reference statistics: cache, formats, errors."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sampling_utils import FakeInception, crops, photos, random_inception_weights

from jit_fast.sampling import fid
from jit_fast.sampling.sampler import to_uint8


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """Randomly initialised Inception weights in a local file (nothing is downloaded)."""
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth", seed=0)


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(scope="module")
def photo_sets(tmp_path_factory):
    """Two small sets from real photos: scikit-image crops, and augmented scikit-learn/-image crops."""
    pics = photos()
    root = tmp_path_factory.mktemp("photo_sets")
    set_a = crops(pics[:4], 16, 64, seed=0, augment=False)
    set_b = crops(pics[4:] + pics[:1], 12, 80, seed=1, augment=True)
    return set_a, set_b, write_pngs(root / "a", set_a), write_pngs(root / "b", set_b)


def in_memory_features(ext, images: np.ndarray) -> dict:
    acc = fid.FeatureAccumulator(ext, 64)
    acc.add(images[:7], 0)  # delivered in pieces, as generation chunks arrive
    acc.add(images[7:], 7)
    return acc.gather()


def test_in_memory_is_and_fid_stats_equal_torch_fidelity(inception_weights, photo_sets):
    """IS and the FID statistics (mu, sigma) equal torch-fidelity's on the PNG folder.

    Not bit for bit: here the images arrive in pieces of 7 and 9 while torch-fidelity runs one
    batch of 16, and on some CPUs convolution rounding depends on the batch size.
    """
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

    set_a, _, dir_a, _ = photo_sets
    feats = in_memory_features(fid.build_inception(inception_weights), set_a)
    ours_is = fid.inception_score(feats[fid.LOGITS])
    ours_stats = fid.fid_stats(feats[fid.POOL])

    # torch-fidelity's own folder pipeline (glob, PIL decode, DataLoader batches of 64) and formulas
    kw = dict(input1=str(dir_a), cuda=False, verbose=False, cache=False, save_cpu_ram=True,
              feature_extractor_weights_path=str(inception_weights))
    ext = create_feature_extractor(fid.EXTRACTOR_NAME, [fid.POOL, fid.LOGITS], **kw)
    their_feats = extract_featuresdict_from_input_id(1, ext, **kw)
    theirs = isc_featuresdict_to_metric(their_feats, fid.LOGITS, **kw)
    their_stats = fid_featuresdict_to_statistics(their_feats, fid.POOL)
    assert theirs["inception_score_mean"] > 1.01  # random weights still tell the photos apart
    assert ours_is[0] == pytest.approx(theirs["inception_score_mean"], abs=1e-6, rel=0)
    assert ours_is[1] == pytest.approx(theirs["inception_score_std"], abs=1e-6, rel=0)
    np.testing.assert_allclose(ours_stats["mu"], their_stats["mu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours_stats["sigma"], their_stats["sigma"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_in_memory_fid_is_equal_torch_fidelity_calculate_metrics(inception_weights, photo_sets, tmp_path):
    """End to end: FID (in memory vs a folder reference) and IS equal calculate_metrics to 1e-5 relative.

    The two pipelines feed Inception different batch groupings, and CPUs round convolutions by batch
    size: features agree to about 1e-7 relative (machine-dependent), far below any formula error."""
    import torch_fidelity

    set_a, _, dir_a, dir_b = photo_sets
    ext = fid.build_inception(inception_weights)
    feats = in_memory_features(ext, set_a)
    ref = fid.reference_stats(dir_b, lambda: fid.FeatureAccumulator(ext, 64), "w", cache_dir=tmp_path)
    ours_fid = fid.frechet_distance(fid.fid_stats(feats[fid.POOL]), ref)
    ours_is = fid.inception_score(feats[fid.LOGITS])
    theirs = torch_fidelity.calculate_metrics(
        input1=str(dir_a), input2=str(dir_b), cuda=False, isc=True, fid=True, verbose=False, cache=False,
        save_cpu_ram=True, feature_extractor_weights_path=str(inception_weights),
    )
    assert theirs["frechet_inception_distance"] > 1.0
    assert ours_fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours_is[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert ours_is[1] == pytest.approx(theirs["inception_score_std"], rel=1e-5)


def test_to_uint8_is_the_png_round_trip(tmp_path):
    x = torch.linspace(-1.2, 1.2, 3 * 8 * 8).reshape(1, 3, 8, 8) + torch.randn(1, 3, 8, 8) * 0.3
    u8 = to_uint8(x)[0].numpy()
    Image.fromarray(u8).save(tmp_path / "x.png")
    back = np.asarray(Image.open(tmp_path / "x.png").convert("RGB"))
    assert np.array_equal(back, u8)
    feats = fid.as_uint8_nchw(u8[None])
    assert feats.shape == (1, 3, 8, 8) and feats.is_contiguous()


def test_grid_pieces_follow_global_batches():
    assert list(fid.grid_pieces(0, 150, 64)) == [(0, 64), (64, 64), (128, 22)]
    assert list(fid.grid_pieces(60, 10, 64)) == [(0, 4), (4, 6)]
    assert list(fid.grid_pieces(128, 64, 64)) == [(0, 64)]


def test_accumulator_orders_by_index_whatever_the_feeding_order():
    ext = FakeInception()
    images = crops(photos(), 30, 32, seed=3, augment=True)
    ordered = fid.FeatureAccumulator(ext, 8)
    ordered.add(images, 0)
    shuffled = fid.FeatureAccumulator(ext, 8)
    for s in (16, 0, 24, 8):
        shuffled.add(images[s : s + 8], s)
    a, b = ordered.gather(), shuffled.gather()
    assert torch.equal(a["index"], torch.arange(30)) and torch.equal(b["index"], torch.arange(30))
    assert torch.equal(a[fid.POOL], b[fid.POOL]) and torch.equal(a[fid.LOGITS], b[fid.LOGITS])
    dup = fid.FeatureAccumulator(ext, 8)
    dup.add(images[:4], 0)
    dup.add(images[:4], 2)
    with pytest.raises(RuntimeError, match="twice"):
        dup.gather()


def test_folder_stats_are_cached_and_reused(tmp_path):
    ref = write_pngs(tmp_path / "ref", crops(photos(), 12, 48, seed=5, augment=True))
    cache = tmp_path / "cache"
    ext = FakeInception()
    make = lambda: fid.FeatureAccumulator(ext, 5)  # noqa: E731
    first = fid.reference_stats(ref, make, "weights-a", cache_dir=cache)
    calls = ext.calls
    assert calls == 3 and len(list(cache.glob("*.npz"))) == 1
    again = fid.reference_stats(ref, make, "weights-a", cache_dir=cache)
    assert ext.calls == calls  # served from the cache, no Inception pass
    assert np.array_equal(first["mu"], again["mu"]) and np.array_equal(first["sigma"], again["sigma"])
    direct = fid.fid_stats(_features(ext, ref))
    assert np.array_equal(first["mu"], direct["mu"]) and np.array_equal(first["sigma"], direct["sigma"])
    # other Inception weights -> another cache entry
    fid.reference_stats(ref, make, "weights-b", cache_dir=cache)
    assert ext.calls > calls and len(list(cache.glob("*.npz"))) == 2
    # changed folder content -> recomputed
    calls = ext.calls
    img = ref / "000003.png"
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(img)
    os.utime(img, ns=(1, 1))
    changed = fid.reference_stats(ref, make, "weights-a", cache_dir=cache)
    assert ext.calls > calls and not np.array_equal(changed["mu"], first["mu"])


def _features(ext, folder: Path) -> torch.Tensor:
    acc = fid.FeatureAccumulator(ext, 5)
    fid.features_of_files(acc, fid.list_images(folder))
    return acc.gather()[fid.POOL]


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_images_npz_reference_equals_folder_reference(tmp_path, save):
    images = crops(photos(), 9, 40, seed=2, augment=False)
    folder = write_pngs(tmp_path / "ref", images)
    save(tmp_path / "ref.npz", arr_0=images, arr_1=np.arange(9))  # an ADM-style sample batch
    ext = FakeInception()
    make = lambda: fid.FeatureAccumulator(ext, 4)  # noqa: E731
    a = fid.reference_stats(folder, make, "w", cache_dir=tmp_path / "c")
    b = fid.reference_stats(tmp_path / "ref.npz", make, "w", cache_dir=tmp_path / "c")
    assert np.array_equal(a["mu"], b["mu"]) and np.array_equal(a["sigma"], b["sigma"])
    rows = fid.NpzRows(tmp_path / "ref.npz", "arr_0")
    assert np.array_equal(rows.read(3, 7), images[3:7]) and np.array_equal(rows.read(0, 2), images[:2])
    rows.close()


def test_stats_file_roundtrip_and_fid_values(tmp_path):
    rng = np.random.default_rng(0)
    stats = fid.fid_stats(torch.from_numpy(rng.standard_normal((50, fid.FEATURE_DIM)).astype(np.float32)))
    assert stats["mu"].dtype == np.float32 and stats["sigma"].dtype == np.float64  # torch-fidelity's dtypes
    fid.save_stats(tmp_path / "s.npz", stats, note="x")
    loaded = fid.load_stats_npz(tmp_path / "s.npz")
    assert np.array_equal(loaded["mu"], stats["mu"]) and np.array_equal(loaded["sigma"], stats["sigma"])
    # the formula on small well-conditioned Gaussians (a 2048-d eigvals takes ~40 s on 2 cores)
    d = 64
    a = rng.standard_normal((d, d)) / d**0.5
    g = {"mu": np.zeros(d, np.float32), "sigma": a @ a.T + np.eye(d)}
    assert fid.frechet_distance(g, g) == pytest.approx(0.0, abs=1e-9)
    shifted = {"mu": g["mu"].astype(np.float64) + 0.5, "sigma": g["sigma"]}  # ADM files hold float64
    assert fid.frechet_distance(g, shifted) == pytest.approx(0.25 * d, rel=1e-9)
    scaled = {"mu": g["mu"], "sigma": 4 * g["sigma"]}  # tr(S + 4S - 2 * 2S) = tr(S)
    assert fid.frechet_distance(g, scaled) == pytest.approx(np.trace(g["sigma"]), rel=1e-9)


@pytest.mark.parametrize(
    "content,match",
    [
        (dict(m=np.zeros(2048), s=np.eye(2048)), "expected FID statistics 'mu'"),
        (dict(mu=np.zeros(64), sigma=np.eye(64)), "do not fit the 2048-d"),
        (dict(mu=np.zeros(2048), sigma=np.eye(64)), "do not fit the 2048-d"),
        (dict(mu=np.full(2048, np.nan), sigma=np.eye(2048)), "NaN"),
        (dict(mu=np.zeros(2048, np.int64), sigma=np.eye(2048)), "floating point"),
    ],
)
def test_bad_stats_file_gives_clear_error(tmp_path, content, match):
    path = tmp_path / "ref.npz"
    np.savez(path, **content)
    with pytest.raises(fid.StatsError, match=match):
        fid.reference_stats(path, FakeInception, "w", cache_dir=tmp_path)


def test_unusable_references(tmp_path):
    (tmp_path / "notes.npz").write_text("not a zip")
    with pytest.raises(fid.StatsError, match="not a readable .npz"):
        fid.reference_stats(tmp_path / "notes.npz", FakeInception, "w", cache_dir=tmp_path)
    with pytest.raises(fid.StatsError, match="not found"):
        fid.reference_stats(tmp_path / "missing", FakeInception, "w", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(fid.StatsError, match="at least 2 images"):
        fid.reference_stats(tmp_path / "empty", FakeInception, "w", cache_dir=tmp_path)


def test_inception_weight_errors(tmp_path, monkeypatch):
    with pytest.raises(fid.InceptionWeightsError, match="not found"):
        fid.build_inception(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(fid.InceptionWeightsError, match="cannot load Inception weights"):
        fid.build_inception(bad)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    with pytest.raises(fid.InceptionWeightsError, match="--inception-weights"):
        fid.build_inception(None)
