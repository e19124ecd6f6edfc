"""`fastllava eval --ray [--replicas N]`: the evaluation as a Ray Data pipeline, one model replica
per actor (an actor pool of N; num_cpus=1 each on the CPU, num_gpus=1 each on CUDA), writing the
results.json and samples.jsonl that plain eval writes.

The unit of work is one of eval's batches (the questions [k*B, (k+1)*B)), so every question is
asked in the batch eval asks it in and the answers are eval's. Ray runs a local cluster sized for
the replicas unless RAY_ADDRESS names one to join (then the model folder and the images must be
readable at the same paths on its workers). Ray comes from the `ray` extra, imported only here.
A sweep (`eval --ray --reduce A,B --keep ...`) runs each of its evaluations so on one cluster;
its rows then carry no prefill time (that is measured on a model in the process that times it,
`fastllava eval` without --ray).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from ..errors import UserError
from ..extras import require
from .dataset import Dataset, Sample, load_dataset
from .progress import Progress
from .runner import _answers, _row, answer_kwargs, check_budgets, finish


class Replica:
    """One model replica: a Ray Data actor answering whole eval batches."""

    def __init__(self, model: str | None, load_options: dict, kwargs: dict):
        from .. import load

        self.kwargs, self.model, self.fatal = kwargs, None, None
        try:
            self.model = load(model, **load_options)
        except UserError as e:  # answered for every batch; the driver raises it as one line
            self.fatal = str(e)

    def __call__(self, batch: dict) -> dict:
        out = {"index": [], "rows": [], "info": []}
        for index, text in zip(batch["index"], batch["samples"]):
            samples, kwargs = [_sample(s) for s in json.loads(text)], self.kwargs
            errors: list[str] = []
            try:
                if self.fatal is not None:
                    raise UserError(self.fatal)
                check_budgets(self.model, samples, [kwargs.get("reduce")])
                results = _answers(self.model, samples, kwargs, errors)
            except UserError as e:  # carried to the driver
                rows, info = [], {"fatal": str(e)}
            else:
                rows = [_row(s, r) for s, r in zip(samples, results) if r is not None]
                info = {"skipped": errors, "model": _describe(self.model)}
            out["index"].append(int(index))
            out["rows"].append(json.dumps(rows, ensure_ascii=False))
            out["info"].append(json.dumps(info))
        return out


def evaluate_ray(model: str | None, load_options: dict, data_dir: str | Path | Dataset, replicas: int | None = None,
                 batch_size: int = 8, limit: int | None = None, out_dir: str | Path | None = None,
                 progress: bool = True, generate_kwargs: dict | None = None) -> dict:
    """As runner.evaluate(load(model, **load_options), data_dir, ...), on `replicas` Ray actors."""
    data, samples = _start(data_dir, batch_size, limit)
    if not os.environ.get("RAY_ADDRESS"):  # a local cluster reads the files the driver sees
        _check_model(model, load_options, (generate_kwargs or {}).get("reduce"))
    kwargs = answer_kwargs(samples, generate_kwargs)
    replicas, answered = _answer_all(model, load_options, samples, batch_size, kwargs, replicas, progress)
    return _results(data, answered, batch_size, limit, kwargs, replicas, out_dir)


def sweep_ray(model: str | None, load_options: dict, data_dir: str | Path | Dataset, methods, keeps,
              replicas: int | None = None, batch_size: int = 8, limit: int | None = None,
              out_dir: str | Path | None = None, progress: bool = True, generate_kwargs: dict | None = None) -> dict:
    """As sweep.sweep(load(model, **load_options), ...), each evaluation on `replicas` Ray actors of
    one cluster (prefill times not measured)."""
    import ray

    from .sweep import run_sweep

    data, samples = _start(data_dir, batch_size, limit)
    config = _check_model(model, load_options, None)
    view = SimpleNamespace(config=config, path=str(model or ""))

    started = []  # the cluster this sweep starts at its first run, after run_sweep has checked every budget

    def run(kwargs: dict, run_dir: Path | None, bar: Progress) -> dict:
        if not ray.is_initialized():  # one cluster for every run (each run's actors load the model again)
            _init(ray, replicas or (_gpu_count() if _on_gpu(load_options.get("device")) else 1))
            started.append(True)
        kwargs = answer_kwargs(samples, kwargs)
        used, answered = _answer_all(model, load_options, samples, batch_size, kwargs, replicas, False)
        bar.update(len(samples))
        return _results(data, answered, batch_size, limit, kwargs, used, run_dir)

    try:
        return run_sweep(view, data, methods, keeps, limit, out_dir, progress, generate_kwargs, run)
    finally:
        if started:
            ray.shutdown()


def _init(ray, replicas: int) -> None:
    """A local cluster for `replicas` actors, or RAY_ADDRESS's."""
    options = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": replicas + 1}
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, **options)


def _start(data_dir, batch_size: int, limit: int | None) -> tuple[Dataset, list[Sample]]:
    """Ray imported (or the extra named), the arguments checked, the set read: (dataset, samples asked)."""
    require("ray", "ray", "fastllava eval --ray")
    require("ray.data", "ray", "fastllava eval --ray")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    data = data_dir if isinstance(data_dir, Dataset) else load_dataset(data_dir)
    samples = data.samples[:limit] if limit is not None else data.samples
    if not samples:
        first = f"; first problem: {data.errors[0]}" if data.errors else ""
        raise UserError(f"no usable questions in {data.root}{first}")
    return data, samples


def _answer_all(model, load_options: dict, samples: list[Sample], batch_size: int, kwargs: dict,
                replicas: int | None, progress: bool) -> tuple[int, tuple[list[dict], list[str], dict]]:
    """(replicas, (rows, skipped samples, the model's description)): eval's batches through the
    pipeline on a local cluster (or RAY_ADDRESS's)."""
    import ray

    gpu = _on_gpu(load_options.get("device"))
    replicas = replicas or (_gpu_count() if gpu else 1)
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    items = [{"index": k, "samples": json.dumps([_plain(s) for s in b])} for k, b in enumerate(batches)]
    started = not ray.is_initialized()
    if started:
        _init(ray, replicas)
    try:
        done = _run(ray, items, model, load_options, kwargs, replicas, gpu,
                    Progress("eval", len(samples), enabled=progress), [len(b) for b in batches])
    finally:
        if started:
            ray.shutdown()
    rows, skipped, described = [], [], None
    for k in range(len(batches)):
        batch_rows, info = done[k]
        if "fatal" in info:
            raise UserError(info["fatal"])
        rows += batch_rows
        skipped += info["skipped"]
        described = described or info["model"]
    return replicas, (rows, skipped, described)


def _results(data: Dataset, answered, batch_size: int, limit: int | None, kwargs: dict, replicas: int,
             out_dir: Path | None) -> dict:
    """runner.evaluate's results (and files, with out_dir) from one run's answers."""
    rows, skipped, described = answered
    ray = {"ray": {"replicas": replicas, "address": os.environ.get("RAY_ADDRESS") or "local"}}
    return finish(_model_view(described), data, rows, list(data.errors) + skipped, batch_size, limit, kwargs,
                  out_dir, ray)


def _run(ray, items, model, load_options, kwargs, replicas, gpu, bar: Progress, sizes: list[int]) -> dict:
    """{batch index: (rows, info)} from the pipeline: from_items -> map_batches(Replica) on an actor pool."""
    ctx, logger = ray.data.DataContext.get_current(), logging.getLogger("ray.data")
    saved = ctx.enable_progress_bars, logger.level
    ctx.enable_progress_bars = False  # ours instead (--quiet turns it off)
    logger.setLevel(logging.WARNING)
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            Replica, fn_constructor_kwargs={"model": model, "load_options": load_options, "kwargs": kwargs},
            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=replicas),
            **({"num_gpus": 1} if gpu else {"num_cpus": 1}))
        done = {}
        for r in ds.iter_rows():
            i = int(r["index"])
            done[i] = (json.loads(r["rows"]), json.loads(r["info"]))
            bar.update(sizes[i])
        bar.close()
        return done
    finally:
        ctx.enable_progress_bars = saved[0]
        logger.setLevel(saved[1])


def _check_model(model: str | None, load_options: dict, reduce):
    """load()'s checks before the weights, and the reduction spec against the config, in the driver:
    a bad model folder or spec fails before the cluster starts, as plain eval fails before loading.
    Returns the model's LlavaConfig."""
    from ..assets import resolve_model_path
    from ..checkpoint import checkpoint_files
    from ..config import LlavaConfig
    from ..generation import check_decode_mode
    from ..quant.spec import parse_kv_cache, parse_weights
    from ..reduction.runtime import make_reduction

    parse_weights(load_options.get("weights"))
    parse_kv_cache(load_options.get("kv_cache"))
    check_decode_mode(load_options.get("decode"))
    path = resolve_model_path(model)
    checkpoint_files(path)
    config = LlavaConfig.from_file(path / "config.json")
    make_reduction(reduce, config)
    return config


def _plain(s: Sample) -> dict:
    return {**asdict(s), "image": str(s.image)}


def _sample(d: dict) -> Sample:
    return Sample(**{**d, "image": Path(d["image"])})


def _describe(model) -> dict:
    """What runner._summary reads of a model, as strings (it runs in the driver, which holds none)."""
    kv = getattr(getattr(model, "runner", None), "kv_cache", None)
    return {"path": str(getattr(model, "path", None) or type(model).__name__), "device": str(model.device),
            "dtype": str(model.model.dtype), "weights": str(getattr(model, "weights", None) or "fp"),
            "kv_cache": str(kv or "fp"), "decode": str(getattr(model, "decode", "eager"))}


def _model_view(d: dict) -> SimpleNamespace:
    return SimpleNamespace(path=d["path"], device=d["device"], model=SimpleNamespace(dtype=d["dtype"]),
                           weights=d["weights"], runner=SimpleNamespace(kv_cache=d["kv_cache"]), decode=d["decode"])


def _on_gpu(device: str | None) -> bool:
    if device is not None:
        return str(device).startswith("cuda")
    import torch

    return torch.cuda.is_available()


def _gpu_count() -> int:
    import torch

    return max(1, torch.cuda.device_count())
