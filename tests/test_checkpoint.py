"""Checkpoints: atomic saves, keep-last, async saves, official import/export, safe unpickling, weight loading."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_helpers import assert_bitwise_equal, assert_distinct_decays, checkpoint_tensors, read_losses, tiny_argv

from jit_fast.checkpoint import (
    CheckpointError,
    ModelMeta,
    build_model_from_meta,
    export_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_official_checkpoint,
    load_weights,
)
from jit_fast.checkpoint.dcp import read_meta, resolve_checkpoint
from jit_fast.checkpoint.meta import ARCH_KEYS
from jit_fast.checkpoint.official import (
    official_param_order,
    official_state_dict_shapes,
    optimizer_from_official,
    safe_load,
)
from jit_fast.configs import model_config
from jit_fast.model.network import JiT
from jit_fast.train.trainer import main

TINY_MODEL = dict(depth=2, in_context_start=1)


@pytest.fixture(scope="module")
def run4(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uninterrupted 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run4")
    assert main(tiny_argv(data, out, "--max-steps", "4", "--save-freq-steps", "2")) == 0
    return out


def test_interrupted_save_leaves_the_previous_checkpoint_latest(
    data: Path, run4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A writer that dies midway (some bytes written, then an error) never becomes the checkpoint resume picks."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    out = tmp_path / "run"
    original = FileSystemWriter.write_data
    calls = {"n": 0}

    def dying_writer(self, plan, planner):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save (step 4): half a shard, then the disk "fills up"
            Path(self.path, "__0_0.distcp").write_bytes(b"\x00" * 1000)
            raise OSError(28, "No space left on device (simulated)")
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", dying_writer)
    assert main(tiny_argv(data, out, "--max-steps", "4", "--save-freq-steps", "2")) == 2
    err = capsys.readouterr().err
    assert "is full" in err and "step_000000004" in err and "step_000000002 is intact" in err
    monkeypatch.setattr(FileSystemWriter, "write_data", original)
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    # resume picks step 2 and reaches the uninterrupted run's state exactly
    assert main(tiny_argv(data, out, "--max-steps", "4", "--save-freq-steps", "2", "--resume", str(out))) == 0
    assert_bitwise_equal(checkpoint_tensors(run4), checkpoint_tensors(out))


def test_half_written_directories_are_never_resumed(run4: Path, tmp_path: Path) -> None:
    """A crash mid-save leaves .tmp-step_N (or a step dir without meta.json): resume ignores it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run4, run)
    ck = run / "checkpoints"
    shutil.copytree(ck / "step_000000004", ck / ".tmp-step_000000006")  # data written, never renamed
    (ck / "step_000000008").mkdir()
    (ck / "step_000000008" / ".metadata").write_bytes(b"partial")  # no meta.json: incomplete
    assert resolve_checkpoint(run).path.name == "step_000000004"
    assert latest_checkpoint(run).name == "step_000000004"
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        resolve_checkpoint(ck / "step_000000008")


def test_keep_last_and_stale_tmp_cleanup(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step_000000099").mkdir(parents=True)
    assert main(tiny_argv(data, out, "--max-steps", "5", "--save-freq-steps", "1", "--keep-last", "2")) == 0
    assert [s for s, _ in list_checkpoints(out)] == [4, 5]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    meta = read_meta(latest_checkpoint(out))
    assert meta["model_meta"] == {"model": "JiT-T/4", "img_size": 16, "num_classes": 4,
                                  "overrides": TINY_MODEL}
    assert (meta["step"], meta["epoch"], meta["step_in_epoch"], meta["global_batch"]) == (5, 0, 5, 8)


def test_async_save_matches_sync(data: Path, run4: Path, tmp_path: Path) -> None:
    out = tmp_path / "async"
    assert main(tiny_argv(data, out, "--max-steps", "2", "--save-freq-steps", "2", "--async-save")) == 0
    assert main(tiny_argv(data, out, "--max-steps", "4", "--save-freq-steps", "2", "--async-save",
                          "--resume", str(out))) == 0
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert_bitwise_equal(checkpoint_tensors(run4), checkpoint_tensors(out))
    assert read_losses(out) == read_losses(run4)


# ------------------------------------------------------------------------------------------------
# official interop


def official_dict(cfg, epoch: int = 1, seed: int = 0) -> dict:
    """An official-format checkpoint built from the official key list (random weights and AdamW state)."""
    g = torch.Generator().manual_seed(seed)
    shapes = official_state_dict_shapes(cfg)

    def weights():
        return {f"net.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}

    net = JiT(cfg)
    named = [(n, p.shape, p.requires_grad) for n, p in net.named_parameters()]
    order = official_param_order(named)
    n_no_decay = sum(1 for n, s, rg in named if rg and (len(s) == 1 or n.endswith(".bias")))
    state = {i: {"step": torch.tensor(float(7 * (epoch + 1))), "exp_avg": torch.randn(shapes[n], generator=g),
                 "exp_avg_sq": torch.rand(shapes[n], generator=g)} for i, n in enumerate(order)}
    group = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, amsgrad=False, maximize=False, foreach=None,
                 capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True)
    optimizer = {"state": state, "param_groups": [
        {**group, "weight_decay": 0.0, "params": list(range(n_no_decay))},
        {**group, "weight_decay": 0.0, "params": list(range(n_no_decay, len(order)))},
    ]}
    args = argparse.Namespace(model="JiT-T/4", img_size=cfg.input_size, class_num=cfg.num_classes,
                              attn_dropout=0.0, proj_dropout=0.0, blr=5e-5, batch_size=8,
                              jit_fast_overrides=dict(TINY_MODEL))
    return {"model": weights(), "model_ema1": weights(), "model_ema2": weights(), "optimizer": optimizer,
            "epoch": epoch, "args": args}


def _assert_official_equal(a: dict, b: dict) -> None:
    for key in ("model", "model_ema1", "model_ema2"):
        assert a[key].keys() == b[key].keys()
        bad = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not bad, f"{key}: {bad[:3]}"
    assert a["epoch"] == b["epoch"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    groups = [[g["params"] for g in x["optimizer"]["param_groups"]] for x in (a, b)]
    assert groups[0] == groups[1]


def test_official_import_export_roundtrip_is_bitwise(data: Path, tmp_path: Path) -> None:
    """official .pth -> train.py --resume (model, EMAs, AdamW state, epoch) -> DCP -> official .pth, bitwise."""
    cfg = model_config("JiT-T/4", img_size=16, num_classes=4, **TINY_MODEL)
    src = official_dict(cfg, epoch=1)
    path = tmp_path / "checkpoint-last.pth"
    torch.save(src, path)
    # resume from the official folder; no steps left to train: epoch 2 starts at step 2 * 8 = 16
    out = tmp_path / "imported"
    assert main(tiny_argv(data, out, "--max-steps", "16", "--resume", str(tmp_path))) == 0
    meta = read_meta(latest_checkpoint(out))
    assert (meta["step"], meta["epoch"], meta["step_in_epoch"]) == (16, 2, 0)
    exported = export_checkpoint(out, tmp_path / "export" / "checkpoint-last.pth")
    back = safe_load(exported)
    _assert_official_equal(src, back)
    assert back["args"].model == "JiT-T/4" and back["args"].class_num == 4
    # and once more through the importer
    again = tmp_path / "again"
    assert main(tiny_argv(data, again, "--max-steps", "16", "--resume", str(exported))) == 0
    _assert_official_equal(src, safe_load(export_checkpoint(again, tmp_path / "again.pth")))


def test_official_import_keeps_training(data: Path, tmp_path: Path) -> None:
    cfg = model_config("JiT-T/4", img_size=16, num_classes=4, **TINY_MODEL)
    torch.save(official_dict(cfg, epoch=0), tmp_path / "checkpoint-last.pth")
    out = tmp_path / "run"
    assert main(tiny_argv(data, out, "--max-steps", "10", "--resume", str(tmp_path / "checkpoint-last.pth"))) == 0
    assert sorted(read_losses(out)) == [9, 10]


def test_optimizer_import_only_where_shapes_allow() -> None:
    cfg = model_config("JiT-T/4", img_size=16, num_classes=4, **TINY_MODEL)
    src = official_dict(cfg)
    other = JiT(model_config("JiT-T/4", img_size=16, num_classes=5, **TINY_MODEL))
    named = [(n, p.shape, p.requires_grad) for n, p in other.named_parameters()]
    osd, why = optimizer_from_official(src["optimizer"], named)
    assert osd is None and "y_embedder.embedding_table.weight" in why


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_disallowed_global_is_refused(data: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "epoch": 0, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load .*allow-list"):
        load_official_checkpoint(path)
    assert main(tiny_argv(data, tmp_path / "o", "--resume", str(path))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: refused to load")
    # plain pickle of a global outside the allow-list, too
    p2 = tmp_path / "evil2.pth"
    with open(p2, "wb") as f:
        pickle.dump({"model": {}, "x": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError):
        safe_load(p2)


def test_load_weights_from_every_kind(run4: Path, tmp_path: Path) -> None:
    """DCP dir, run dir, official .pth and safetensors give the same weights and enough metadata to rebuild."""
    ref = checkpoint_tensors(run4)
    pth = export_checkpoint(run4, tmp_path / "ckpt.pth")
    st = export_checkpoint(run4, tmp_path / "ema1.safetensors", "ema1")
    st2 = export_checkpoint(run4, tmp_path / "ema2.safetensors", "ema2")
    for which in ("ema1", "ema2", "model"):
        want = {k.split("/", 1)[1]: v for k, v in ref.items() if k.startswith(which + "/")}
        sources = [run4, latest_checkpoint(run4), pth] + ([st] if which == "ema1" else [st2] if which == "ema2" else [])
        for src in sources:
            sd, meta = load_weights(src, which)
            assert sd.keys() == want.keys(), src
            assert all(torch.equal(sd[k], want[k]) for k in sd), (src, which)
            assert (meta.model, meta.img_size, meta.num_classes) == ("JiT-T/4", 16, 4), (src, meta)
            assert meta.overrides.get("depth") == 2
    with pytest.raises(CheckpointError, match="holds the ema1 weights"):
        load_weights(st, "ema2")
    net, meta = load_model(st)
    z, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 3])
    net2 = build_model_from_meta(meta)
    net2.load_state_dict(load_weights(run4, "ema1")[0])
    assert torch.equal(net(z, t, y), net2.eval()(z, t, y))
    assert meta.step == 4 and load_weights(pth)[1].epoch == -1  # official: no epoch finished yet


# model metadata exactly as the current code writes it: meta.json["model_meta"] and a safetensors header
ON_DISK_MODEL_META = {"model": "JiT-T/4", "img_size": 16, "num_classes": 4,
                      "overrides": {"depth": 2, "in_context_start": 1, "attn_drop": 0.0}}
ON_DISK_HEADER = {**ON_DISK_MODEL_META, "noise_scale": 1.0, "t_eps": 0.05, "P_mean": -0.8, "P_std": 0.8,
                  "step": 4, "epoch": 0}


def test_model_meta_reads_and_writes_the_on_disk_format(run4: Path, tmp_path: Path) -> None:
    """ModelMeta round-trips both on-disk objects; an unknown, missing or mistyped key names the checkpoint."""
    from safetensors.torch import save_file

    meta = ModelMeta.from_dict(ON_DISK_MODEL_META, "run/meta.json", required=ARCH_KEYS)
    assert (meta.model, meta.img_size, meta.num_classes, meta.step) == ("JiT-T/4", 16, 4, None)
    assert meta.to_dict() == ON_DISK_MODEL_META
    head = ModelMeta.from_dict(ON_DISK_HEADER, "w.safetensors")
    assert {**head.to_dict(), "step": head.step, "epoch": head.epoch} == ON_DISK_HEADER
    # what a run writes today is read back unchanged (meta.json and an exported header)
    mm = read_meta(latest_checkpoint(run4))["model_meta"]
    assert ModelMeta.from_dict(mm, "x", required=ARCH_KEYS).to_dict() == mm
    st = export_checkpoint(run4, tmp_path / "w.safetensors")
    with safe_open(str(st), framework="pt") as f:
        header = json.loads(f.metadata()["jit_fast_meta"])
    assert set(header) == set(ON_DISK_HEADER) and header["step"] == 4
    for bad, match in (({**ON_DISK_MODEL_META, "modle": "JiT-B/16"}, r"run/meta.json: unknown .*'modle'"),
                       ({"model": "JiT-T/4", "overrides": {}}, r"run/meta.json: model metadata lacks \['img_size', "),
                       ({**ON_DISK_MODEL_META, "img_size": "16px"}, r"run/meta.json: .*img_size='16px'"),
                       ([1, 2], r"run/meta.json: model metadata is a list")):
        with pytest.raises(CheckpointError, match=match):
            ModelMeta.from_dict(bad, "run/meta.json", required=ARCH_KEYS)
    # through the loader: a header with a key this version does not know is refused, naming the file
    path = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"jit_fast_meta": json.dumps({**ON_DISK_HEADER, "x": 1})})
    with pytest.raises(CheckpointError, match=f"{path}: unknown model metadata key"):
        load_weights(path)


def test_export_cli(run4: Path, tmp_path: Path) -> None:
    from jit_fast.export import main as ckpt_main

    assert ckpt_main([str(run4), str(tmp_path / "w.safetensors"), "--which", "ema2"]) == 0
    assert ckpt_main([str(tmp_path / "missing"), str(tmp_path / "w.pth")]) == 2
    assert ckpt_main([str(run4), str(tmp_path / "w.npz")]) == 2


def test_each_ema_follows_its_configured_decay_across_a_resume(data: Path, tmp_path: Path,
                                                              one_thread_test: None) -> None:
    """ema_k = d^k p_0 + sum_i (1 - d) d^(k-i) p_i (float64) over the parameters after each of 3 steps, a save, a
    resume and 3 more, with d the decay the config asked for (--ema-decay1 / --ema-decay2, distinct), not the EMA's
    own `decay`: an EMA built or restored with the other one's decay, or from the other one's shadow, fails."""
    from jit_fast.shared.distributed import DistEnv, full_tensor
    from jit_fast.train.cli import parse_config
    from jit_fast.train.trainer import Trainer, resolve_run

    out = tmp_path / "ema"
    history: list[list[torch.Tensor]] = []

    def record(tr: Trainer) -> None:
        history.append([full_tensor(p).detach().double().clone() for p in tr.state.params])

    for extra in (("--max-steps", "3"), ("--max-steps", "6", "--resume", str(out))):
        cfg, explicit = parse_config(tiny_argv(data, out, *extra))
        env = DistEnv()
        tr = Trainer(resolve_run(cfg, env, explicit), env)
        if not history:
            record(tr)  # p_0, the weights both EMAs start from
        tr.run(step_callback=record)
    assert len(history) == 7 and tr.step == 6
    assert_distinct_decays(cfg.ema_decay1, cfg.ema_decay2)
    for ema, d in ((tr.state.ema1, cfg.ema_decay1), (tr.state.ema2, cfg.ema_decay2)):
        assert ema.decay == d
        k = len(history) - 1
        for j, s in enumerate(ema.shadow):
            ref = d**k * history[0][j] + sum((1 - d) * d ** (k - i) * history[i][j] for i in range(1, k + 1))
            torch.testing.assert_close(s.double(), ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# integrity (checksums.json) and resume rules


def flip_byte(path: Path, where: float = 0.5) -> None:
    """Invert one byte in the middle of a file (silent corruption: same size, still parseable)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_saved_file_is_in_the_manifest(data: Path, run4: Path, tmp_path: Path) -> None:
    """Sync and async saves record every file of the checkpoint, and the digests verify."""
    from jit_fast.shared import integrity

    out = tmp_path / "async"
    assert main(tiny_argv(data, out, "--max-steps", "2", "--async-save")) == 0
    for ckpt in (latest_checkpoint(run4), latest_checkpoint(out)):
        manifest = integrity.read_manifest(ckpt)
        assert sorted(manifest) == integrity.checkpoint_files(ckpt)
        assert {".metadata", "meta.json", "rank00000.pt"} <= set(manifest)
        assert integrity.verify_files(ckpt)


def test_flipped_byte_is_detected_and_named(data: Path, run4: Path, tmp_path: Path, capsys) -> None:
    from jit_fast.export import main as export_main

    run = tmp_path / "run"
    shutil.copytree(run4, run)
    ckpt = latest_checkpoint(run)
    shard = sorted(ckpt.glob("*.distcp"))[0]
    flip_byte(shard)
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupt: its sha256 differs"):
        load_weights(run, "ema1")
    assert export_main([str(run), str(tmp_path / "w.pth")]) == 2
    assert main(tiny_argv(data, tmp_path / "o", "--max-steps", "6", "--resume", str(ckpt))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(str(shard) in e and "--skip-checksum" in e for e in err), err
    # the brave load it anyway
    assert export_main([str(run), str(tmp_path / "w.pth"), "--skip-checksum"]) == 0
    load_weights(run, "ema1", verify=False)
    # a truncated file is named by its size, before hashing
    (ckpt / "rank00000.pt").write_bytes((ckpt / "rank00000.pt").read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"rank00000.pt is corrupt: \d+ bytes"):
        load_weights(run, "ema1")


def test_checkpoint_without_manifest_loads_with_a_warning(run4: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(run4, run)
    (latest_checkpoint(run) / "checksums.json").unlink()
    sd, _ = load_weights(run, "ema1")
    assert sd and "has no checksums.json" in capsys.readouterr().err


def test_resuming_an_older_checkpoint_in_place(data: Path, run4: Path, tmp_path: Path, capsys) -> None:
    """Refused (auto-resume would later pick the old history); --discard-newer moves the newer ones aside."""
    run = tmp_path / "run"
    shutil.copytree(run4, run)
    old = run / "checkpoints" / "step_000000002"
    assert main(tiny_argv(data, run, "--max-steps", "3", "--resume", str(old))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "older than step_000000004" in err[0] and "--discard-newer" in err[0], err
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    # branching into another directory needs no flag
    assert main(tiny_argv(data, tmp_path / "branch", "--max-steps", "3", "--resume", str(old))) == 0
    assert main(tiny_argv(data, run, "--max-steps", "3", "--resume", str(old), "--discard-newer")) == 0
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    (moved,) = run.glob("discarded-*/checkpoints/step_000000004")
    assert (moved / "meta.json").is_file()
    capsys.readouterr()
    assert main(tiny_argv(data, run, "--max-steps", "4", "--auto-resume")) == 0
    assert "resumed from " + str(run / "checkpoints" / "step_000000003") in capsys.readouterr().out


def test_metrics_rows_are_not_duplicated_after_a_resume(data: Path, tmp_path: Path) -> None:
    """Steps logged after the last checkpoint (then lost to a kill) are redone once, the old rows kept aside."""
    out = tmp_path / "run"
    assert main(tiny_argv(data, out, "--max-steps", "6", "--save-freq-steps", "4", "--keep-last", "0")) == 0
    shutil.rmtree(out / "checkpoints" / "step_000000006")  # killed after logging step 6, before saving it
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.')  # and mid-way through a row
    assert main(tiny_argv(data, out, "--max-steps", "8", "--auto-resume")) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    dropped = (out / "metrics.dropped.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in dropped[:2]] == [5, 6] and dropped[2].startswith('{"step": 7')


def test_finite_but_exploded_weights_stop_the_run(data: Path, tmp_path: Path) -> None:
    """|x| = 1e30 in an embedding row the data never uses: loss and grad norm stay finite, the guard still stops."""
    from jit_fast.train.cli import parse_config
    from jit_fast.train.trainer import TrainingDiverged, run_training

    out = tmp_path / "boom"
    cfg, explicit = parse_config(tiny_argv(data, out, "--num-classes", "5", "--max-steps", "8",
                                           "--save-freq-steps", "2"))

    def explode(tr) -> None:
        if tr.step == 3:
            with torch.no_grad():
                params = dict(zip(tr.state.names, tr.state.params, strict=True))
                params["y_embedder.embedding_table.weight"][4].fill_(1e30)

    with pytest.raises(TrainingDiverged, match=r"weights exploded .*loss \d.*Last good checkpoint: .*step_000000002"):
        run_training(cfg, explicit, step_callback=explode)
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert all(v.abs().max() < 1e6 for v in checkpoint_tensors(out).values() if v.is_floating_point())


def test_verified_digests_are_reused_only_while_size_mtime_and_record_match(tmp_path: Path) -> None:
    """The per-process cache of verified digests skips re-hashing a file only while its size and mtime are those
    it was hashed at AND the manifest still records that digest: a same-size rewrite with a new mtime is hashed
    again, and a manifest whose digest changed is checked against the file, not waved through."""
    from jit_fast.shared import integrity

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "a.bin").write_bytes(b"x" * 64)
    integrity.write_manifest(d, integrity.digest_files(d, ["a.bin"]))
    assert integrity.verify_files(d)
    old = integrity.file_digest(d / "a.bin")
    st = (d / "a.bin").stat()
    (d / "a.bin").write_bytes(b"y" * 64)
    os.utime(d / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert integrity.known_digest(d / "a.bin") == integrity.file_digest(d / "a.bin") != old
    (d / "a.bin").write_bytes(b"x" * 64)
    os.utime(d / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert integrity.verify_files(d)  # back to the verified bytes, size and mtime: cached
    entries = integrity.read_manifest(d)
    entries["a.bin"] = dict(entries["a.bin"], sha256="0" * 64)
    integrity.write_manifest(d, entries)
    with pytest.raises(integrity.ChecksumError, match="a.bin is corrupt"):
        integrity.verify_files(d)
