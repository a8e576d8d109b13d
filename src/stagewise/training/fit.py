"""The plumbing both trainings share: one run of a sentence-transformers trainer, wired our way.

Its arguments from a :class:`TrainArgs`, its progress (and every logged loss) on our bar and in the run's
``metrics.jsonl``, a time limit that still keeps the best checkpoint, resuming from the last checkpoint, and the
training examples kept in the run so a resumed run trains on the same ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from stagewise.rundir import RunDir
from stagewise.timing import span
from stagewise.training.config import LOSS_POINTS, TrainArgs


def _progress_with_loss():
    """The trainer's progress on our rich bar (steps, rate, ETA, the latest loss) instead of its tqdm bars and
    printed dicts; every logged loss also goes to the run's ``metrics.jsonl``. Instantiated as ``cls(run, phase)``."""
    from transformers import TrainerCallback

    from stagewise.progress import progress_bar

    class LossProgressCallback(TrainerCallback):
        def __init__(self, run: RunDir | None = None, phase: str = "train"):
            self.run, self.phase = run, phase
            self.bar, self.task = None, None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and self.bar is None:
                self.bar = progress_bar()
                self.bar.start()
                self.task = self.bar.add_task(f"{self.phase}: steps", total=state.max_steps,
                                              completed=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            if self.bar is not None:
                self.bar.update(self.task, description=f"{self.phase}: steps (loss {logs['loss']:.4f})")
            if self.run is not None:
                extra = {"learning_rate": logs["learning_rate"]} if "learning_rate" in logs else {}
                self.run.log_metrics({"loss": logs["loss"], **extra}, phase=self.phase, epoch=state.epoch,
                                     steps=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

        def close(self) -> None:
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return LossProgressCallback


def training_arguments(cls, config: TrainArgs, run: RunDir, has_dev: bool, extra: dict,
                        checkpoints: str = "checkpoints"):
    import torch

    strategy = "steps" if config.eval_steps else "epoch"
    args = dict(
        output_dir=str(run.path / checkpoints),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=5e-5 if config.learning_rate is None else config.learning_rate,  # 0 freezes, as asked
        warmup_ratio=config.warmup_ratio,
        seed=config.seed,
        data_seed=config.seed,
        # a fraction: the trainer logs every ceil(fraction × max steps), so every step of a run shorter than that
        logging_steps=config.logging_steps or 1 / LOSS_POINTS,
        disable_tqdm=True,  # our bar instead (_progress_with_loss)
        save_strategy=strategy,
        save_total_limit=2,
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=config.bf16,
        use_cpu=config.bf16 and not torch.cuda.is_available(),  # transformers refuses bf16 on a CPU unless told
        **extra,
    )
    if config.eval_steps:
        args.update(eval_steps=config.eval_steps, save_steps=config.eval_steps)
    if has_dev:
        args.update(eval_strategy=strategy, load_best_model_at_end=True, metric_for_best_model="eval_dev_ndcg@10",
                    greater_is_better=True)
    return cls(**args)


def _time_limit(seconds: float):
    """Stop training once ``seconds`` have passed, evaluating and saving first so the best checkpoint is kept."""
    from transformers import TrainerCallback

    class TimeLimitCallback(TrainerCallback):
        stopped_at_step: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.start > seconds and not control.should_training_stop:
                self.stopped_at_step = state.global_step
                control.should_training_stop = True
                if args.eval_strategy == "steps":  # per epoch, the epoch's end (which comes next) evaluates and saves
                    control.should_evaluate = control.should_save = True

    return TimeLimitCallback()


def fit_trainer(trainer_cls, model, args, train_dataset, loss, evaluator, config: TrainArgs, run: RunDir, resume: bool,
         phase: str = "train", name: str = "model"):
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    callbacks = []
    if evaluator is not None and config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    limit = _time_limit(config.max_seconds) if config.max_seconds else None
    if limit:
        callbacks.append(limit)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_dataset, loss=loss, evaluator=evaluator,
                          callbacks=callbacks)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # what disable_tqdm puts in its place: logs printed as dicts
    progress = _progress_with_loss()(run, phase)
    trainer.add_callback(progress)
    checkpoints = sorted(Path(args.output_dir).glob("checkpoint-*"))
    with span("pretrain" if phase == "pretrain" else "train", name, unit="examples") as timed:
        try:
            trainer.train(resume_from_checkpoint=bool(resume and checkpoints) or None)
        finally:  # an error or Ctrl-C never leaves the bar drawing
            progress.close()
        # examples trained on (a bi-encoder's example is a tuple of texts, a cross-encoder's one pair)
        timed.items = min(trainer.state.global_step * args.per_device_train_batch_size,
                          len(train_dataset) * args.num_train_epochs)
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "stopped_at_time_limit": bool(limit and limit.stopped_at_step is not None),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_dev_ndcg@10": trainer.state.best_metric,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "loss_history": [(h["step"], h["loss"]) for h in history],
    }


def to_hf_dataset(columns: dict):
    from datasets import Dataset

    return Dataset.from_dict(columns)


def load_saved_examples(run: RunDir, name: str) -> dict | None:
    """Training examples (mined negatives included) are kept in the run: a resumed run trains on the same ones."""
    path = run.path / name
    return json.loads(path.read_text()) if path.is_file() else None
