"""The training core on a tiny linear model: the loop, early stopping, checkpoints and resume, in well
under a second; the named random streams; the stage cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from defectkit.core import training as T
from defectkit.core.errors import ConfigError, DataError, MissingFileError, TrainingError


def _problem():
    """A 1-feature regression (y = 2x + 1) and an Adam optimizer: deterministic full-batch steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.linspace(-1, 1, 16)[:, None]
    y = 2 * x + 1

    def train_epoch(epoch: int) -> float:
        loss = torch.mean((model(x) - y) ** 2)
        T.check_finite(loss.detach(), epoch + 1, 1, 0.1)
        T.backward_step(loss, opt)
        return float(loss.detach())

    return model, opt, train_epoch


def _scripted(scores):
    """A validation that returns the given scores in order, whatever the model."""
    return lambda epoch, loss: (scores[epoch], scores[epoch])


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience(tmp_path):
    model, opt, train_epoch = _problem()
    ckpt = T.Checkpointer(tmp_path, {"model": model}, {"optimizer": opt}, {"base_key": "k"})
    seen = {}

    def validate(epoch, loss):
        seen[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return _scripted([0.1, 0.5, 0.4, 0.45, 0.3, 0.9])(epoch, loss)

    cfg = T.LoopConfig(epochs=6, patience=2, val_name="val_auroc", quiet=True)
    state = T.fit_loop(cfg, T.RunState(), train_epoch, validate, ckpt)
    # 0.5 at epoch index 1 is the best; 0.4 and 0.45 are two validations without gain: stop after index 3
    assert [h["epoch"] for h in state.history] == [1, 2, 3, 4]
    assert (state.best, state.stale, state.epoch) == (0.5, 2, 3)
    assert [h["val_auroc"] for h in state.history] == [0.1, 0.5, 0.4, 0.45]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 1 and best["best"] == 0.5 and best["base_key"] == "k" and "optim" not in best
    ckpt.load_best()
    assert all(torch.equal(v, seen[1][k]) for k, v in model.state_dict().items())
    assert [h["epoch"] for h in T.load_checkpoint(tmp_path / "last.pt")["history"]] == [1, 2, 3, 4]
    assert (tmp_path / "history.json").is_file()


def test_validate_every_n_epochs_and_after_the_last(tmp_path):
    model, opt, train_epoch = _problem()
    calls = []

    def validate(epoch, loss):
        calls.append(epoch)
        return 1.0 - loss, None  # selection value; nothing logged

    cfg = T.LoopConfig(epochs=5, patience=99, val_every=2, quiet=True)
    state = T.fit_loop(cfg, T.RunState(), train_epoch, validate, T.Checkpointer(tmp_path, {"model": model}))
    assert calls == [1, 3, 4] and [h["val"] for h in state.history] == [None] * 5
    assert state.history[0]["train_loss"] > state.history[-1]["train_loss"]  # it does train


def test_an_interrupted_loop_resumes_to_the_same_weights_optimizer_and_history(tmp_path):
    def run(folder, epochs, state=None, die_at=None, resume=False):
        model, opt, train_epoch = _problem()
        ckpt = T.Checkpointer(folder, {"model": model}, {"optimizer": opt})
        if resume:
            state = ckpt.resume()

        def step(epoch):
            if epoch == die_at:
                raise KeyboardInterrupt
            return train_epoch(epoch)

        return T.fit_loop(T.LoopConfig(epochs, 99, quiet=True), state or T.RunState(), step,
                          lambda e, loss: (-loss, -loss), ckpt), model

    full, model_a = run(tmp_path / "a", 6)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 6, die_at=3)
    assert T.load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 2
    resumed, model_b = run(tmp_path / "b", 6, resume=True)
    assert all(torch.equal(v, model_b.state_dict()[k]) for k, v in model_a.state_dict().items())
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]
    assert resumed.best == full.best


def test_resume_without_a_checkpoint_or_from_another_base_is_refused(tmp_path):
    model, opt, train_epoch = _problem()
    with pytest.raises(MissingFileError, match="nothing to resume"):
        T.Checkpointer(tmp_path, {"model": model}).resume()
    T.Checkpointer(tmp_path, {"model": model}, {"optimizer": opt}, {"base_key": "a"}).save(T.RunState(), True)
    other = T.Checkpointer(tmp_path, {"model": model}, {"optimizer": opt}, {"base_key": "b"}, check=("base_key",))
    with pytest.raises(ConfigError, match="base_key a, not b"):
        other.resume()
    torch.save({"model": model.state_dict()}, tmp_path / "old.pt")  # not this schema
    with pytest.raises(DataError, match="old.pt"):
        T.load_weights(tmp_path / "old.pt", {"model": model})


def test_only_the_writer_writes(tmp_path):
    model, _, _ = _problem()
    T.Checkpointer(tmp_path, {"model": model}, writer=False).save(T.RunState(), True)
    assert list(tmp_path.iterdir()) == []


def test_run_state_counts_patience_by_hand():
    s = T.RunState()
    assert s.best == -math.inf
    assert s.record(0, {}, 0.5) and (s.best, s.stale) == (0.5, 0)
    assert not s.record(1, {}, 0.50005) and s.stale == 1  # within min_delta: no gain
    assert not s.record(2, {}, None) and s.stale == 1  # an epoch without validation does not count
    assert s.record(3, {}, 0.7) and (s.best, s.stale, s.epoch, len(s.history)) == (0.7, 0, 3, 4)


def test_a_non_finite_loss_names_the_epoch_step_and_learning_rate():
    T.check_finite(1.0, 1, 1, 0.1)
    with pytest.raises(TrainingError, match="became nan at epoch 3, step 7.*now 0.5"):
        T.check_finite(float("nan"), 3, 7, 0.5)
    with pytest.raises(TrainingError, match="became inf"):
        T.check_finite(torch.tensor(float("inf")), 1, 1, 1e-3)


def test_random_streams_depend_on_seed_epoch_and_position_only():
    draw = lambda *k: T.rng(*k).random(4)  # noqa: E731
    assert np.array_equal(draw(0, 1, "crop", 5), draw(0, 1, "crop", 5))
    for other in [(1, 1, "crop", 5), (0, 2, "crop", 5), (0, 1, "crop", 6), (0, 1, "flip", 5), (0, 1, "defect", 5)]:
        assert not np.array_equal(draw(0, 1, "crop", 5), draw(*other)), other
    # the keys are fixed forever: a seed draws what earlier versions drew for it
    assert np.array_equal(draw(3, 2, "crop", 9), np.random.default_rng([3, 2, 9, 3]).random(4))
    assert np.array_equal(draw(3, 2, "prompt", 9), np.random.default_rng([3, 2, 11, 9]).random(4))
    assert np.array_equal(draw(3, 2, "epoch"), np.random.default_rng([3, 2]).random(4))
    with pytest.raises(KeyError, match="unknown random stream"):
        T.rng(0, 0, "colour")
    a, b = T.epoch_generator(0, 1), T.epoch_generator(0, 1)
    assert torch.equal(torch.randint(100, (5,), generator=a), torch.randint(100, (5,), generator=b))


def test_a_stage_is_reused_only_with_the_same_info(tmp_path):
    info = {"images": 6, "path": tmp_path / "x"}
    assert not T.stage_done(tmp_path, info)
    T.mark_stage_done(tmp_path, info)
    assert T.stage_done(tmp_path, info) and not T.stage_done(tmp_path, {**info, "images": 7})


def test_configs_come_from_the_arguments_of_the_same_name(tmp_path):
    import argparse
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class C:
        lr: float = 1.0
        epochs: int = 2

    args = argparse.Namespace(lr=0.5, epochs=3, other="x")
    assert T.config_from_args(C, args) == C(0.5, 3)
    assert T.config_from_args(C, args, epochs=9) == C(0.5, 9)
    assert T.write_run_args(tmp_path, C(0.5, 3)) == {"lr": 0.5, "epochs": 3}
    assert T.write_run_args(tmp_path, argparse.Namespace(out=tmp_path))["out"] == str(tmp_path)


def test_mean_over_a_single_process_and_the_loss_module():
    assert T.mean_over_processes(6.0, 3) == 2.0 and T.mean_over_processes(0.0, 0) == 0.0
    lin = torch.nn.Linear(2, 1)
    step = T.LossModule(lin, lambda m, x: m(x).sum())
    assert list(step.parameters()) == list(lin.parameters())  # DDP would see the model's parameters
    assert step(torch.ones(3, 2)).shape == ()


class _Clock:
    """time.perf_counter for fit_loop: each training epoch takes ``epoch_s`` seconds, validation none."""

    def __init__(self, epoch_s: float):
        self.now, self.epoch_s = 0.0, epoch_s

    def __call__(self) -> float:
        return self.now

    def train(self, train_epoch):
        def run(epoch):
            self.now += self.epoch_s
            return train_epoch(epoch)
        return run


def test_a_time_budget_sets_the_epoch_count_and_tells_the_schedule(tmp_path, monkeypatch):
    model, opt, train_epoch = _problem()
    clock = _Clock(10.0)
    monkeypatch.setattr(T.time, "perf_counter", clock)
    told, validated = [], []

    def validate(epoch, loss):
        validated.append(epoch)
        return -loss, None

    # 35 s of 10 s epochs: 3 fit (by hand: floor(35 / 10)), though 50 were asked for; validation every 2
    # epochs and after the last one, which is only known once the budget is
    cfg = T.LoopConfig(epochs=50, patience=99, val_every=2, quiet=True, time=35 / 3600)
    state = T.fit_loop(cfg, T.RunState(), clock.train(train_epoch), validate, T.Checkpointer(tmp_path, {"m": model}),
                       on_epochs=told.append)
    assert [h["epoch"] for h in state.history] == [1, 2, 3]
    assert told == [3] and validated == [1, 2]
    # more time than the asked epochs need: the budget wins, as Ultralytics' time= (25 s -> 2 epochs of 10 s,
    # 95 s -> 9)
    assert T.epochs_that_fit(25 / 3600, [10.0, 10.0], 1) == 2
    assert T.epochs_that_fit(95 / 3600, [10.0], 1) == 9 and T.epochs_that_fit(1 / 3600, [10.0], 4) == 4
    assert T.share_time(1.0, 8, 32) == 0.25 and T.share_time(None, 8, 32) is None


def test_a_resumed_run_keeps_its_time_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(T.time, "perf_counter", clock := _Clock(20.0))
    model, opt, train_epoch = _problem()
    ckpt = T.Checkpointer(tmp_path, {"model": model}, {"optimizer": opt})
    first = T.fit_loop(T.LoopConfig(epochs=2, patience=99, quiet=True), T.RunState(), clock.train(train_epoch),
                       lambda e, loss: (-loss, None), ckpt)  # stopped after 2 epochs of 20 s
    assert len(first.history) == 2
    clock.epoch_s = 10.0
    cfg = T.LoopConfig(epochs=50, patience=99, quiet=True, time=65 / 3600)
    state = T.fit_loop(cfg, ckpt.resume(), clock.train(train_epoch), lambda e, loss: (-loss, None), ckpt)
    # the history's 40 s count: 65 s hold 3 epochs of 20 s; after a third of 10 s the mean is 50/3 s and
    # 65 s hold 3.9 epochs, so the run ends at 3 (alone, the new 10 s epochs would have allowed 6)
    assert [h["epoch"] for h in state.history] == [1, 2, 3]
