"""The training run: build the sharded model, resume if a checkpoint exists, step, log, save.

    records -> loader (this process's rows) -> global batch (sharded over data x fsdp)
            -> jitted step (trainable tree only) -> metrics.jsonl / TensorBoard / checkpoints

Every process runs this same loop on its own rows; each writes its own data-iterator state into
each checkpoint and its records' ids to `examples/process_{i}-of-{n}.jsonl`, and all take part in
writing the final `WORKDIR/model`.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emola_jax.checkpoint import PAD_TO_SQUARE, PRIOR_RECIPES, TOKENIZER_DIR, load_tokenizer, save_pretrained
from emola_jax.config import EmolaConfig
from emola_jax.data.conversation import IGNORE_INDEX
from emola_jax.data.landmark_store import read_info
from emola_jax.data.pipeline import Batch, make_train_loader
from emola_jax.data.synthetic import SyntheticData, SyntheticLoader
from emola_jax.models import EmolaForConditionalGeneration
from emola_jax.models.emola import check_inputs
from emola_jax.progress import bar as progress_bar
from emola_jax.sharding import global_batch, logical_axes_table, make_mesh, state_shardings
from emola_jax.train import step as train_step
from emola_jax.train.checkpoints import TrainCheckpoints, abstract_like, base_fingerprint
from emola_jax.train.config import Experiment
from emola_jax.train.init import build_model, training_config
from emola_jax.train.metrics import MetricsWriter, StepLog
from emola_jax.train.rerun import check_rerun, recorded, to_json

FINAL_MODEL = "model"
EXAMPLES_DIR = "examples"  # per process: the record ids of each step's rows


def make_loader(experiment: Experiment, config: EmolaConfig):
    """This process's batches: an iterator with `get_state()` / `set_state()`."""
    data = experiment.data
    index, count = jax.process_index(), jax.process_count()
    if isinstance(data, SyntheticData):
        return SyntheticLoader(data, config, index, count)
    if data is None:
        raise ValueError("the config has no data section (experiment.data)")
    if experiment.train.base is None:
        raise ValueError("training on records needs train.base: its tokenizer turns the conversations into ids")
    tokenizer = load_tokenizer(experiment.train.base)
    return iter(make_train_loader(data, tokenizer, config, index, count))


def _preprocessing(data) -> dict[str, Any]:
    """How the training inputs were made, for the model's source.json: images padded to a square
    (an export to LLaVA's format repeats it; synthetic batches have no images to say it of), and
    the recipe of each prior's feature store where its footer names one (evaluation checks its
    own stores against them)."""
    out: dict[str, Any] = {}
    pad = getattr(data, "pad_to_square", None)
    if pad is not None:
        out[PAD_TO_SQUARE] = bool(pad)
    files = getattr(data, "landmarks", None) or ()
    infos = [read_info(f) for f in ((files,) if isinstance(files, (str, Path)) else files)]
    recipes = {info.prior: info.recipe for info in infos if info.recipe is not None}
    if recipes:
        out[PRIOR_RECIPES] = recipes
    return out


def _pad_to(batch: Batch, length: int) -> Batch:
    """The token arrays right-padded from `[rows, L]` to `[rows, length]` (labels with IGNORE_INDEX)."""
    pad = lambda x, value=0: np.pad(x, [(0, 0), (0, length - x.shape[1])], constant_values=value)  # noqa: E731
    return batch.replace(input_ids=pad(batch.input_ids), labels=pad(batch.labels, IGNORE_INDEX),
                         attention_mask=pad(batch.attention_mask))


def next_batch(loader, accum: int) -> Batch:
    """`accum` micro-batches stacked `[accum, rows, ...]`, padded to one length that every
    process agrees on (length buckets may differ between micro-batches and hosts). Record ids,
    when the loader gives them, stay a host array `ids [accum, rows]`."""
    micro = [next(loader) for _ in range(accum)]
    length = max(m.input_ids.shape[1] for m in micro)
    if jax.process_count() > 1:
        length = int(np.max(multihost_utils.process_allgather(np.int32(length))))
    return jax.tree.map(lambda *xs: np.stack(xs), *(_pad_to(m, length) for m in micro))


def _stacked_global(local: Batch, mesh) -> Batch:
    """Like `global_batch`, for `[accum, rows, ...]` arrays (rows are the sharded axis)."""
    rows_first = jax.tree.map(lambda x: np.moveaxis(x, 0, 1), local)
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), global_batch(rows_first, mesh))


class Trainer:
    """The sharded model, optimiser and jitted step of a run, without files: `step(local_batch)`.

    `local_batch` holds this process's rows as `[accum, rows, ...]` numpy arrays (`next_batch`);
    `state` is the `TrainState`, sharded.
    """

    def __init__(self, experiment: Experiment, mesh: Mesh | None = None):
        cfg = experiment.train
        self.mesh = mesh if mesh is not None else make_mesh(cfg.mesh)
        model, self.fresh = build_model(experiment, self.mesh)
        model.language_model.set_attention(cfg.attention)  # static: the split graphdef carries it
        self.config: EmolaConfig = model.config
        self.graphdef, self.template, params, self.frozen = train_step.split_trainable(model, cfg)
        self.optimizer, self.schedules = train_step.make_optimizer(cfg, params)
        init = functools.partial(train_step.init_state, optimizer=self.optimizer, seed=cfg.seed)
        shardings = state_shardings(  # Adam moments as their weights
            jax.eval_shape(init, params), self.mesh, logical_axes_table(model))
        self.state = jax.jit(init, out_shardings=shardings)(params)
        self._step = jax.jit(
            train_step.make_train_step(self.graphdef, self.template, self.optimizer, cfg),
            donate_argnums=(0,),
            out_shardings=(shardings, NamedSharding(self.mesh, PartitionSpec())),
        )

    def step(self, local_batch: Batch) -> dict[str, jax.Array]:
        """One update; returns the step's metrics as device arrays (fetching them waits for the step)."""
        arrays = local_batch.replace(ids=None)  # the record ids stay on the host
        rows = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), arrays)  # [accum * rows, ...]
        check_inputs(self.config, rows.input_ids, rows.pixel_values, rows.attention_mask, rows.landmarks,
                     padding="right")  # on the host: the jitted step cannot see values
        with jax.set_mesh(self.mesh):  # kernels under shard_map (splash attention) read the mesh here
            self.state, metrics = self._step(self.state, self.frozen, _stacked_global(arrays, self.mesh))
        return metrics

    def model(self) -> EmolaForConditionalGeneration:
        """The trained model (trainable weights cast to their storage dtype, LoRA kept apart)."""
        return nnx.merge(self.graphdef, train_step.as_model_state(self.template, self.state.params), self.frozen)


class Progress:
    """What a run tells as it goes: `metrics.jsonl` and TensorBoard (process 0), this process's
    record ids per step, and the progress bar. Metrics are fetched a step late, while the next
    step runs; `flush()` (at each checkpoint) writes what is pending."""

    def __init__(self, workdir: Path, cfg, schedules: dict, start: int, last: int, progress: bool):
        is_main = jax.process_index() == 0
        self.cfg, self.schedules, self.last = cfg, schedules, last
        self.metrics = MetricsWriter(workdir, resume_step=start, enabled=is_main)
        ids_file = f"process_{jax.process_index()}-of-{jax.process_count()}.jsonl"
        self.examples = StepLog(workdir / EXAMPLES_DIR / ids_file, resume_step=start)
        self.bar = progress_bar(total=last, initial=start, desc="train", unit="step", enabled=progress and is_main)
        self.losses: dict[int, float] = {}
        self._pending: tuple[int, dict] | None = None
        self._clock = time.perf_counter()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.metrics.close()
        self.examples.close()

    def started(self, step: int, local: Batch, metrics: dict) -> None:
        """Step `step` was dispatched: its record ids are logged, the previous step reported."""
        if local.ids is not None:
            self.examples.write({"step": step, "ids": local.ids.reshape(-1).tolist()})
        self._report_pending()
        self._pending = (step, metrics)

    def flush(self) -> None:
        """Reports the pending step and puts TensorBoard's events on disk (a lost process keeps them)."""
        self._report_pending()
        self.metrics.flush()

    def _report_pending(self) -> None:
        if self._pending is not None:
            self._report(*self._pending)
            self._pending = None

    def _report(self, step: int, metrics: dict) -> None:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        elapsed, self._clock = now - self._clock, now  # steady state: one step per interval
        check_finite(step, metrics, self.cfg.on_nonfinite)
        loss = self.losses[step] = float(metrics["loss"])
        rates = {name: float(schedule(step - 1)) for name, schedule in self.schedules.items()}
        record = {
            "step": step, "loss": loss, "learning_rate": max(rates.values()), "grad_norm": float(metrics["grad_norm"]),
            "tokens_per_second": float(metrics["input_tokens"]) / elapsed, "scored_tokens": int(metrics["tokens"]),
            "skipped_updates": int(metrics["skipped"]), "step_seconds": elapsed,
        }
        if len(rates) > 1:
            record.update({f"learning_rate/{name}": rate for name, rate in rates.items()})
        if step % self.cfg.log_every == 0 or step == self.last:
            self.metrics.write(record)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_second']:.0f}", refresh=False)
        self.bar.update(1)


def check_finite(step: int, metrics: dict, policy: str) -> None:
    """The non-finite policy: `stop` ends the run at a non-finite loss or gradient (the step has
    already dropped that update); `skip` goes on, counting the dropped updates in the metrics."""
    if not bool(metrics["finite"]) and policy == "stop":
        raise FloatingPointError(
            f"step {step}: loss {float(metrics['loss'])} or gradient norm {float(metrics['grad_norm'])} is not finite; "
            "the update was not applied and the run stops (train.on_nonfinite=stop; 'skip' drops such updates and "
            "goes on)"
        )


def resume(trainer: Trainer, loader, checkpoints: TrainCheckpoints) -> int:
    """Restores the latest checkpoint (training state and this process's data position) into
    `trainer` and `loader`; returns its step (0: a fresh run)."""
    start = checkpoints.latest_step() or 0
    if start:
        trainer.state, data_state = checkpoints.restore(abstract_like(trainer.state))
        loader.set_state(data_state)
    return start


def is_checkpoint_step(step: int, cfg, last: int) -> bool:
    """Every `train.checkpoint_every` steps and at the run's last step (a stop by `--until` too)."""
    return step % cfg.checkpoint_every == 0 or step == last


def save_final_model(trainer: Trainer, experiment: Experiment, workdir: Path) -> Path:
    """`WORKDIR/model`, a checkpoint `load_pretrained` reads, with the base's tokenizer; every
    process writes its shards."""
    cfg = experiment.train
    tokenizer = Path(cfg.base) / TOKENIZER_DIR if cfg.base else None
    files = sorted(tokenizer.iterdir()) if tokenizer is not None and tokenizer.is_dir() else []
    source = {"format": "emola-jax", "trained_from": cfg.base, "steps": cfg.steps, **_preprocessing(experiment.data)}
    if cfg.base_quantization != "none":  # the kernels are written as the dequantised values it trained over
        source["base_quantization"] = {"method": cfg.base_quantization, "block_size": cfg.quantization_block_size}
    return save_pretrained(trainer.model(), workdir / FINAL_MODEL, overwrite=True, tokenizer_files=files,
                           source=source)


def train(
    experiment: Experiment, workdir: str | Path, *, until: int | None = None, progress: bool = True, loader=None,
    extend: bool = False,
) -> dict[str, Any]:
    """Trains to `experiment.train.steps` (or stops after step `until`), resuming from the latest
    checkpoint in `workdir`. Returns a summary: first and last loss, steps, and, once the run is
    complete, `model`, the path of the trained model. `loader` replaces the config's data (any
    iterator with `get_state`/`set_state`). A rerun under settings that alter the run's
    trajectory is refused (`emola_jax.train.rerun`); `extend` allows raising `train.steps`."""
    cfg = experiment.train
    model_config, _ = training_config(experiment)  # a missing or mismatched base: an error before anything else
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    fingerprint = base_fingerprint(cfg.base) if cfg.base is not None else None
    # closed on every way out, errors included: its background writer must not outlive the run
    with TrainCheckpoints(workdir, keep=cfg.keep_checkpoints, base=cfg.base, fingerprint=fingerprint) as checkpoints:
        kept = recorded(experiment, model_config)
        check_rerun(workdir, kept, checkpoints.latest_step(), extend=extend, kept=checkpoints.latest_settings())
        checkpoints.settings = to_json(kept)
        trainer = Trainer(experiment)
        loader = loader if loader is not None else make_loader(experiment, trainer.config)
        start = resume(trainer, loader, checkpoints)
        last = min(cfg.steps, until) if until is not None else cfg.steps
        with Progress(workdir, cfg, trainer.schedules, start, last, progress) as report:
            for step in range(start + 1, last + 1):
                local = next_batch(loader, cfg.grad_accum_steps)
                data_state = loader.get_state()  # the position after this step's rows
                report.started(step, local, trainer.step(local))
                if is_checkpoint_step(step, cfg, last):
                    report.flush()
                    checkpoints.save(step, trainer.state, data_state)
            report.flush()
        checkpoints.wait()

    summary: dict[str, Any] = {"workdir": str(workdir), "steps": last, "fresh_weights": len(trainer.fresh)}
    if report.losses:
        summary.update(first_loss=report.losses[min(report.losses)], last_loss=report.losses[max(report.losses)])
    if last == cfg.steps:
        summary["model"] = save_final_model(trainer, experiment, workdir)
    return summary
