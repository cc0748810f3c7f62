"""End-to-end training runs on tiny synthetic data: run files, artifact, resume, schedules, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from segsvc.cli import main as segsvc_main
from segsvc.errors import InvalidArgument
from segsvc.inference.predictor import Predictor
from segsvc.models.artifact import load_artifact, read_manifest
from training.config import ScheduleConfig, load_config
from training.distributed import DistEnv
from training.rundir import CHECKPOINT
from training.schedule import Horizon, build_scheduler, lr_factor, planned_epochs
from training.train import main


def run_dir_of(artifact: Path) -> Path:
    return Path(read_manifest(artifact).training["run_dir"])


def die_in_epoch_two(cfg, monkeypatch) -> None:
    """Run ``cfg`` until epoch 2 has trained (and changed the weights) but the process dies before its checkpoint."""
    import training.train as train_module

    real = train_module.train_one_epoch
    calls = {"n": 0}

    def crash_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        stats = real(*args, **kwargs)
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return stats

    monkeypatch.setattr(train_module, "train_one_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        main(cfg)
    monkeypatch.setattr(train_module, "train_one_epoch", real)


def test_one_epoch_smoke_run_writes_run_files_and_a_servable_artifact(tiny_recipe):
    artifact = main(load_config(tiny_recipe, ["output.run_name=smoke"]))
    run_dir = run_dir_of(artifact)
    assert run_dir.name == "smoke" and run_dir.parent.name == "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1
    for key in ("train_loss", "train_ce", "train_dice", "lr", "images_per_s", "val_miou", "val_pixel_accuracy"):
        assert math.isfinite(rows[0][key]), key
    for name in ("training_curve.png", "config.yaml", CHECKPOINT, "checkpoints/best.pt"):
        assert (run_dir / name).stat().st_size > 0, name

    model, manifest = load_artifact(artifact)
    assert manifest.class_names == ("background", "circle", "rectangle")
    assert manifest.metrics["miou"] == pytest.approx(rows[0]["val_miou"], abs=1e-6)
    assert manifest.metrics["split"] == "val" and manifest.training["recipe"] == "tiny"
    assert manifest.ignore_index == 255 and manifest.spec.arch == "unet"
    labels = Predictor(model, manifest).predict(np.zeros((37, 45, 3), np.uint8))
    assert labels.shape == (37, 45)


def test_loss_falls_on_the_synthetic_set(tiny_recipe):
    artifact = main(load_config(tiny_recipe, ["train.epochs=6", "data.train_limit=16"]))
    rows = [json.loads(x) for x in (run_dir_of(artifact) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows]
    assert len(losses) == 6
    assert losses[-1] < 0.75 * losses[0], losses


def test_interrupt_and_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_recipe, monkeypatch):
    overrides = ["train.epochs=3", "data.train_limit=12"]
    main(load_config(tiny_recipe, [*overrides, "output.run_name=straight"]))

    cfg = load_config(tiny_recipe, [*overrides, "output.run_name=interrupted"])
    die_in_epoch_two(cfg, monkeypatch)
    runs = tiny_recipe.parent / "runs" / "tiny"
    assert torch.load(runs / "interrupted" / CHECKPOINT, weights_only=True)["epoch"] == 1
    main(cfg, resume=str(runs / "interrupted"))

    a = torch.load(runs / "straight" / CHECKPOINT, weights_only=True)
    b = torch.load(runs / "interrupted" / CHECKPOINT, weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    lines = (runs / "interrupted" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]  # no duplicated epoch after the resume


def test_gradient_accumulation_steps_the_optimizer_once_per_group(tiny_recipe):
    # 12 samples, batch 4 -> 3 batches per epoch; accumulating 2 gives 2 optimiser steps per epoch
    artifact = main(load_config(tiny_recipe, ["train.epochs=2", "data.train_limit=12", "train.accumulate_steps=2"]))
    state = torch.load(run_dir_of(artifact) / CHECKPOINT, weights_only=True)
    assert state["scheduler"]["last_epoch"] == 4
    assert state["optimizer"]["state"][0]["step"].item() == 4


def test_early_stopping_and_time_budget_end_the_run(tiny_recipe):
    artifact = main(load_config(tiny_recipe, ["train.epochs=5", "data.train_limit=8", "train.max_time_min=0.0001"]))
    assert read_manifest(artifact).training["epochs_run"] == 1
    artifact = main(load_config(tiny_recipe, ["train.epochs=5", "data.train_limit=8", "optim.lr=0.0",
                                              "train.early_stopping_patience=1"]))
    assert read_manifest(artifact).training["epochs_run"] == 2  # lr 0: epoch 2 cannot improve on epoch 1


def test_elapsed_time_and_cpu_minutes_count_setup_and_each_epochs_checkpoint(tiny_recipe, monkeypatch):
    """elapsed_s (which the time budget reads) and cpu_minutes counted only training and validation: the setup
    before the first epoch and each epoch's checkpoint, metrics line and curve plot went unbilled."""
    import time

    import training.train as train_module

    pause_s = 0.3

    def slow(real):
        def wrapped(*args, **kwargs):
            time.sleep(pause_s)
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(train_module, "load_training_data", slow(train_module.load_training_data))
    monkeypatch.setattr(train_module, "save_checkpoint", slow(train_module.save_checkpoint))
    artifact = main(load_config(tiny_recipe, ["train.epochs=2", "data.train_limit=8", "output.run_name=clock"]))
    rows = [json.loads(x) for x in (run_dir_of(artifact) / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["elapsed_s"] >= pause_s  # the setup (reading the data) is in epoch 1's time
    assert rows[0]["setup_s"] >= pause_s and "setup_s" not in rows[1]  # and recorded, for planned_epochs
    assert rows[1]["elapsed_s"] - rows[0]["elapsed_s"] >= pause_s  # epoch 1's checkpoint write is in epoch 2's
    # the run's total has epoch 2's checkpoint too (train_time_s is rounded to 0.1 s)
    assert read_manifest(artifact).training["train_time_s"] >= rows[1]["elapsed_s"] + pause_s - 0.05
    for row in rows:  # recipe threads: 1, so CPU-minutes are the wall minutes
        assert row["cpu_threads"] == 1 and row["cpu_minutes"] == pytest.approx(row["elapsed_s"] / 60, abs=1e-3)


def test_a_run_the_time_budget_ends_is_validated_and_a_resume_does_not_train_past_the_stop(tiny_recipe):
    """With validation every 2 epochs the budget ended the run after epoch 1 unvalidated, and the artifact had
    no mIoU; a --resume from its checkpoint (a kill -9 while publishing) trained epochs the run never had."""
    cfg = load_config(tiny_recipe, ["train.epochs=5", "data.train_limit=8", "train.max_time_min=0.0001",
                                    "train.val_every_epochs=2", "output.run_name=budget"])
    artifact = main(cfg)
    manifest = read_manifest(artifact)
    assert manifest.training["epochs_run"] == 1 and "miou" in manifest.metrics, manifest.metrics
    resumed = main(cfg, resume=str(run_dir_of(artifact)))
    assert read_manifest(resumed).training["epochs_run"] == 1
    assert torch.load(run_dir_of(artifact) / CHECKPOINT, weights_only=True)["epoch"] == 1


def test_sgd_cosine_median_frequency_and_every_loss_term_train(tiny_recipe):
    overrides = ["optim.name=sgd", "optim.lr=0.05", "schedule.name=cosine", "loss.class_weights=median_frequency",
                 "loss.terms=[{name: ce}, {name: dice, weight: 0.3}, {name: focal, weight: 0.3}, {name: lovasz, weight: 0.3},"
                 " {name: ohem, weight: 0.3}]",
                 "data.train_limit=8"]
    artifact = main(load_config(tiny_recipe, overrides))
    row = json.loads((run_dir_of(artifact) / "metrics.jsonl").read_text().splitlines()[0])
    assert all(math.isfinite(row[f"train_{t}"]) for t in ("ce", "dice", "focal", "lovasz", "ohem"))


def test_ema_run_validates_and_publishes_the_averaged_weights_and_resumes_exactly(tiny_recipe, monkeypatch):
    import training.train as train_module

    overrides = ["train.epochs=3", "data.train_limit=12", "train.ema_decay=0.9", "train.val_every_epochs=3"]
    validated = []
    real_evaluate = train_module.evaluate

    def recording_evaluate(backend, *args, **kwargs):
        validated.append({k: v.clone() for k, v in backend.model.state_dict().items()})
        return real_evaluate(backend, *args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", recording_evaluate)
    artifact = main(load_config(tiny_recipe, [*overrides, "output.run_name=ema-straight"]))
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    runs = tiny_recipe.parent / "runs" / "tiny"
    state = torch.load(runs / "ema-straight" / CHECKPOINT, weights_only=True)
    averaged = {k.removeprefix("module."): v for k, v in state["ema"]["averaged"].items() if k.startswith("module.")}
    assert state["ema"]["updates"] == 9  # 3 batches x 3 epochs
    assert any(not torch.equal(v, averaged[k]) for k, v in state["model"].items() if v.is_floating_point())
    best = torch.load(runs / "ema-straight" / "checkpoints" / "best.pt", weights_only=True)
    model, manifest = load_artifact(artifact)
    published = model.state_dict()
    assert best["epoch"] == 3  # the only validation: the best and published weights are the final average
    assert all(torch.equal(published[k], averaged[k]) for k in published)
    assert all(torch.equal(published[k], best["model"][k]) for k in published)
    # the validation that chose and scored them measured the average, not the trained weights
    assert len(validated) == 1 and all(torch.equal(validated[0][k], averaged[k]) for k in published)
    cfg = load_config(tiny_recipe, [*overrides, "output.run_name=ema-interrupted"])
    die_in_epoch_two(cfg, monkeypatch)
    main(cfg, resume=str(runs / "ema-interrupted"))
    resumed = torch.load(runs / "ema-interrupted" / CHECKPOINT, weights_only=True)
    assert resumed["ema"]["updates"] == 9
    for key, value in state["ema"]["averaged"].items():
        assert torch.equal(value, resumed["ema"]["averaged"][key]), key


@pytest.mark.parametrize("name", ["poly", "cosine", "constant"])
def test_lr_schedules_warm_up_linearly_then_decay(name):
    cfg = ScheduleConfig(name=name, warmup_factor=0.1, power=1.0, min_lr_ratio=0.0)
    f = [lr_factor(step, total=20, warmup=10, cfg=cfg) for step in range(21)]
    assert f[0] == pytest.approx(0.1) and f[5] == pytest.approx(0.55) and f[10] == pytest.approx(1.0)
    expected_end = 1.0 if name == "constant" else 0.0
    assert f[20] == pytest.approx(expected_end)
    if name == "poly":
        assert f[15] == pytest.approx(0.5)
    if name == "cosine":
        assert f[15] == pytest.approx(0.5)


def test_a_crop_that_does_not_fit_the_stride_names_the_fix(tiny_recipe):
    with pytest.raises(InvalidArgument, match=r"data.crop=\[32,32\]"):
        main(load_config(tiny_recipe, ["data.crop=[34, 34]"]))  # the stride is 4


def test_resuming_a_finished_name_is_refused_without_resume(tiny_recipe):
    main(load_config(tiny_recipe, ["output.run_name=same", "data.train_limit=4"]))
    with pytest.raises(InvalidArgument, match="--resume"):
        main(load_config(tiny_recipe, ["output.run_name=same", "data.train_limit=4"]))


def test_segsvc_train_cli_reports_config_errors_with_exit_code_2(tiny_recipe, capsys):
    assert segsvc_main(["train", "--config", str(tiny_recipe), "--set", "train.epochz=2"]) == 2
    assert "train.epochz: unknown key" in capsys.readouterr().err
    assert segsvc_main(["train", "--config", str(tiny_recipe), "--set", "data.train_limit=4"]) == 0


def test_time_horizon_fits_the_epochs_to_the_budget(tiny_recipe):
    env = DistEnv(rank=0, world_size=1, device=torch.device("cpu"))
    cfg = load_config(tiny_recipe, ["schedule.horizon=time", "train.max_time_min=1", "train.epochs=50"])
    assert planned_epochs(cfg, [], 0.0, env) == 50  # nothing timed yet
    assert planned_epochs(cfg, [{}, {}], 20.0, env) == 6  # 10 s per epoch, 60 s budget
    assert planned_epochs(cfg, [{}, {}, {}], 150.0, env) == 3  # over budget: never below the epochs done
    epochs_only = load_config(tiny_recipe, ["train.max_time_min=1", "train.epochs=50"])
    assert planned_epochs(epochs_only, [{}, {}], 20.0, env) == 50
    # Set-up (in elapsed_s since the clock counts it) is paid once: 30 s of it and one 1 s epoch leave 29 s,
    # 29 more epochs, not the 1 that 60 s over a 31 s "mean epoch" would give.
    assert planned_epochs(cfg, [{"setup_s": 30.0}], 31.0, env) == 30
    # each start (a resume) records its own set-up in its first row
    assert planned_epochs(cfg, [{"setup_s": 10.0}, {}, {"setup_s": 10.0}, {}], 24.0, env) == 40  # 4 + 36 s / 1 s


def test_moving_the_horizon_recomputes_the_current_lr():
    from training.config import ScheduleConfig

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    horizon = Horizon(total_steps=100)
    scheduler = build_scheduler(ScheduleConfig(name="poly", power=1.0), optimizer, 10, horizon)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    horizon.set(60, scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 - 50 / 60)


def test_time_horizon_run_ends_with_a_validated_fully_decayed_epoch(tiny_recipe):
    artifact = main(load_config(tiny_recipe, ["schedule.horizon=time", "train.max_time_min=0.0001", "train.epochs=9",
                                              "train.val_every_epochs=5", "data.train_limit=8"]))
    rows = [json.loads(x) for x in (run_dir_of(artifact) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and "val_miou" in rows[0]  # the budget fits one epoch: it is validated


def test_a_finished_time_horizon_is_not_extended_by_a_later_estimate(tiny_recipe, monkeypatch):
    import training.train as train_module

    estimates = {0: 9, 1: 2, 2: 5}  # the machine got faster after epoch 2: too late, the LR is already 0
    monkeypatch.setattr(train_module, "planned_epochs", lambda cfg, history, *_: estimates[len(history)])
    artifact = main(load_config(tiny_recipe, ["schedule.horizon=time", "train.max_time_min=5", "train.epochs=9",
                                              "data.train_limit=8"]))
    rows = [json.loads(x) for x in (run_dir_of(artifact) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["lr"] == 0.0


@pytest.mark.dataset
def test_camvid_smoke_epoch_on_a_few_images(datasets_root, tmp_path):
    recipe = Path(__file__).resolve().parents[2] / "training" / "recipes" / "camvid-unet.yaml"
    cfg = load_config(recipe, [
        "model.params.base_channels=4", "model.params.depth=2", "data.scale=[0.25, 0.25]", "data.crop=[64, 96]",
        "data.val_scale=0.25", "data.train_limit=4", "data.val_limit=2", "train.epochs=1", "train.progress=false",
        "loss.class_weights=null", f"output.runs_dir={tmp_path}/runs", f"output.repo={tmp_path}/repo",
    ])
    manifest = read_manifest(main(cfg))
    assert manifest.class_names[0] == "Sky" and len(manifest.class_names) == 11
    assert manifest.metrics["pixels"] > 0.8 * 2 * 360 * 480  # full-size labels, void excluded


def test_channels_last_trains_on_the_cpu_too_and_publishes_the_same_kind_of_artifact(tiny_recipe, capsys):
    """``train.channels_last`` used to be ignored off CUDA, though it speeds up a CPU step by 1.2-1.4x."""
    from training.distributed import DistEnv
    from training.train import precision

    loop = load_config(tiny_recipe, ["train.channels_last=true"]).train
    amp, memory_format = precision(loop, DistEnv(0, 1, torch.device("cpu")))
    assert memory_format is torch.channels_last and amp is None
    artifact = main(load_config(tiny_recipe, ["train.channels_last=true", "train.epochs=1", "train.device=cpu"]))
    assert "channels_last True" in capsys.readouterr().err
    model, manifest = load_artifact(artifact)
    assert all(p.is_contiguous() for p in model.state_dict().values())  # published in the standard layout
    assert manifest.metrics["miou"] > 0


@pytest.mark.parametrize("native", [True, False])
def test_bf16_applies_on_a_cpu_that_computes_it_natively_and_float32_stays_elsewhere(tiny_recipe, monkeypatch, native):
    """``train.amp=bf16`` used to be dropped on every CPU, though with AVX512-BF16 a step is 1.5-1.8x faster
    than in float32. Emulated bf16 is slower than float32, so a CPU without it keeps float32 and logs why."""
    import training.train as train_module

    monkeypatch.setattr(train_module, "cpu_computes_natively", lambda dtype: native)
    loop = load_config(tiny_recipe, ["train.amp=bf16"]).train
    env = DistEnv(0, 1, torch.device("cpu"))
    assert precision_of(loop, env) == (torch.bfloat16 if native else None)
    assert train_module.amp_note(loop, precision_of(loop, env)) == ("" if native else (
        " (train.amp=bf16 asked, but this CPU has no native bf16 arithmetic: float32 is faster here)"))
    assert precision_of(load_config(tiny_recipe, ["train.amp=fp16"]).train, env) == (torch.float16 if native else None)
    assert precision_of(load_config(tiny_recipe).train, env) is None  # amp none


@pytest.mark.parametrize("bf16_gpu", [True, False])
def test_validation_runs_at_the_served_default_precision_on_every_device(monkeypatch, bf16_gpu):
    """Validation picks the published epoch, so it runs as the server does by default (precision ``auto``),
    not in the training steps' dtype: on CUDA it used to follow ``train.amp``, so an fp32- or fp16-trained
    model was chosen on logits that a bf16-serving GPU does not give. No GPU is needed: only the dtype is asked."""
    from training.train import validation_autocast

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_gpu)
    assert validation_autocast(DistEnv(0, 1, torch.device("cpu"))) is None
    assert validation_autocast(DistEnv(0, 1, torch.device("cuda", 0))) is (torch.bfloat16 if bf16_gpu else torch.float16)


def precision_of(loop, env) -> torch.dtype | None:
    from training.train import precision

    return precision(loop, env)[0]


def test_a_cpu_bf16_run_trains_in_bf16_and_validates_as_served_in_float32(tiny_recipe, monkeypatch, capsys):
    """The training steps run under bf16 autocast; validation, which picks the published epoch, runs the
    served path's float32 (precision ``auto`` on the CPU). Forced on, so it runs on any CPU (emulated there)."""
    import training.train as train_module

    monkeypatch.setattr(train_module, "cpu_computes_natively", lambda dtype: True)
    dtypes: dict[bool, set[torch.dtype]] = {True: set(), False: set()}  # module.training -> conv output dtypes
    real_build = train_module.build_model

    def build_and_watch(spec):
        model = real_build(spec)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, args, out: dtypes[m.training].add(out.dtype))
        return model

    monkeypatch.setattr(train_module, "build_model", build_and_watch)
    artifact = main(load_config(tiny_recipe, ["train.amp=bf16", "train.epochs=2", "train.device=cpu"]))
    assert "amp torch.bfloat16," in capsys.readouterr().err
    assert dtypes == {True: {torch.bfloat16}, False: {torch.float32}}
    rows = [json.loads(x) for x in (run_dir_of(artifact) / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in rows) and rows[-1]["val_miou"] > 0
    model, _ = load_artifact(artifact)
    assert all(p.dtype is torch.float32 for p in model.state_dict().values() if p.is_floating_point())


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_and_channels_last(tiny_recipe, amp):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    artifact = main(load_config(tiny_recipe, ["train.device=cuda", f"train.amp={amp}", "train.channels_last=true",
                                              "train.deterministic=false", "train.epochs=2"]))
    rows = [json.loads(x) for x in (run_dir_of(artifact) / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in rows) and rows[-1]["val_miou"] > 0


def test_training_tunes_the_allocator_before_anything_else(tune_first) -> None:
    """``segsvc train`` / ``python -m training`` keep freed activation and gradient buffers from the start."""
    import training.train as train_module

    with pytest.raises(tune_first(train_module)):
        train_module.cli(["--config", "no-such-recipe.yaml"])
