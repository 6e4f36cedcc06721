"""Apply a trained model to spectra and write a catalogue in the survey's own terms.

    stellarlab-predict ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt input=spectra/   # or python predict.py ...
    stellarlab-predict ckpt_path=... input=[aspcapStar-dr17-2M0000.fits,more.fits]
    stellarlab-predict ckpt_path=... input=flux.npy input_wavelength=wave.npy   # resampled onto the model grid
    stellarlab-predict ckpt_path=... data=apogee data.cuts.preset=rgb             # every spectrum a data config selects

Reads aspcapStar, apStar and .npy spectra (or a DataModule's splits), preprocessed exactly as the
checkpoint's training data was, a block at a time: memory does not grow with the number of spectra.
Writes predictions.fits, .csv and .ecsv (label columns under the survey catalogue's names, with units,
masked where there is no value, provenance in the header) and predictions.json (counts, skipped files)
into the run folder. A file that cannot be read is skipped and listed, unless data.strict=true.
Settings share train.py's names: `trainer.accelerator=`, `data.eval_batch_size=`.
"""

from __future__ import annotations

import logging
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from stellarlab.config import conf_dir, register_resolvers
from stellarlab.errors import command_errors

log = logging.getLogger("stellarlab.predict")
register_resolvers()

#: predict.yaml's reading options under data.*; a data=<option> whose DataModule does not take them leaves them out.
READING_KEYS = ("strict", "workers", "chunk_size")
CATALOG_FORMATS = ("fits", "csv", "ecsv")


def options(cfg: DictConfig) -> dict:
    """predict.py's own settings, each checked by its rule (one error line naming the key)."""
    from stellarlab.checks import Flag, Number, _plain, _show
    from stellarlab.errors import ConfigError

    data = cfg.get("data") or {}
    by_data = data.get("_target_") is not None
    if by_data == (cfg.get("input") is not None):
        raise ConfigError("give the spectra either as input=<file|folder|[files]> or as data=<option> (a data config, "
                          "e.g. data=apogee), not " + ("both" if by_data else "neither"))
    if by_data and cfg.get("input_wavelength") is not None:
        raise ConfigError("input_wavelength= resamples input= .npy spectra; data=<option> spectra are on their own grid: "
                          "drop input_wavelength")
    Flag().check("data.strict", _plain(data.get("strict", False)))
    Flag().check("progress", _plain(cfg.get("progress", True)))
    Number(minimum=1, integer=True, allow_null=True, example="data.workers=4").check("data.workers", _plain(data.get("workers")))
    Number(minimum=1, integer=True, example="data.chunk_size=32").check("data.chunk_size", _plain(data.get("chunk_size", 32)))
    formats = _plain(cfg.get("catalog_formats", list(CATALOG_FORMATS)))
    if not isinstance(formats, list) or not formats or any(f not in CATALOG_FORMATS for f in formats) \
            or len(set(formats)) != len(formats):
        raise ConfigError(f"catalog_formats={_show(formats)} is not valid: list some of {', '.join(CATALOG_FORMATS)}, "
                          "each once; e.g. catalog_formats=[fits,csv]")
    from stellarlab.data.flux import usable_cores

    workers = data.get("workers")
    return {"by_data": by_data, "strict": bool(data.get("strict", False)), "progress": bool(cfg.get("progress", True)),
            "workers": int(workers) if workers is not None else usable_cores(), "chunk_size": int(data.get("chunk_size", 32)),
            "formats": [f".{f}" for f in formats]}


def data_module(cfg: DictConfig, model):
    """The DataModule of `data=<option>`, set up as train.py builds it but streaming its rows (in_memory=auto
    becomes false), checked against the model's grid."""
    import numpy as np

    from stellarlab.checks import accepted_keys, locate_target
    from stellarlab.errors import DataError

    target = locate_target("data", cfg.data)
    keys = accepted_keys(target)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for key in READING_KEYS:
        if keys is not None and key not in keys:
            data.pop(key, None)
    if data.get("in_memory", "auto") == "auto":
        data["in_memory"] = False
    datamodule = hydra.utils.instantiate(data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("predict")
    wavelength, grid = np.asarray(datamodule.wavelength, dtype=np.float64), model.wavelength.cpu().double().numpy()
    if len(wavelength) != len(grid) or not np.allclose(wavelength, grid, rtol=1e-6):
        raise DataError(f"the checkpoint was trained on a {len(grid)}-pixel grid, data={cfg.data._target_} gives "
                        f"{len(wavelength)} pixels on another grid; predict on data preprocessed onto the model's grid")
    return datamodule


def _differences(trained: dict, here: dict) -> list[str]:
    return sorted(k for k in set(trained) | set(here) if trained.get(k) != here.get(k) and k not in ("datamodule", "survey_name"))


def run_predict(cfg: DictConfig) -> dict:
    """Read, predict, write; returns the paths written and the counts."""
    import numpy as np

    from stellarlab.data.surveys import catalog_names
    from stellarlab.errors import DataError
    from stellarlab.results import catalog, ensemble, flags, predict_block, prediction
    from stellarlab.run.validation import predict_settings

    device, batch_size, tolerance = predict_settings(cfg)  # before the checkpoint is read: one line, no traceback
    opts = options(cfg)
    trust = trust_settings(cfg, tolerance)
    members = ensemble.member_checkpoints(cfg.ckpt_path)
    loaded = [prediction.load_checkpoint(m, map_location="cpu") for m in members]
    models = [m for m, _ in loaded]
    ensemble.check_members_agree(models, members, [prediction.preprocessing_of(c) for _, c in loaded])
    for member in models:
        ensemble.check_mc_dropout(member, trust.mc_dropout)
    model, checkpoint = loaded[0]
    preprocessing = prediction.preprocessing_of(checkpoint)
    if device not in ("cpu", "auto"):
        models = [m.to(device) for m in models]
        model = models[0]
    if model.training_domain is None:
        log.warning("the checkpoint predates saved training statistics: no UNLIKENESS score, no UNLIKE_TRAINING or LOW_SNR "
                    "flags (retrain to get them)")
    predict_block.outside_training_range(model, np.empty((0, len(model.label_names))), tolerance)  # the old-checkpoint note, once
    wavelength = model.wavelength.cpu().double().numpy()
    result = prediction.Pass()
    if opts["by_data"]:
        datamodule = data_module(cfg, model)
        differ = _differences(preprocessing, datamodule.preprocessing_config())
        if differ:
            log.warning("data=%s preprocesses spectra otherwise than the checkpoint's training data (%s differ): the model "
                        "may read them wrongly", cfg.data._target_, ", ".join(differ))
        splits, how = datamodule.splits_of_training(prediction.split_record_of(checkpoint), preprocessing.get("survey_name"))
        if splits is None:
            log.warning("no SPLIT column: %s; do not evaluate the model on these rows unless you know it never saw them", how)
        else:
            log.info("SPLIT column: %s", how)
        tasks = prediction.data_tasks(datamodule, min(batch_size, prediction.READ_ROWS), splits)
        source = f"data={cfg.data._target_}"
    else:
        files = prediction.find_inputs(cfg.input, cfg.format)
        tasks = prediction.file_tasks(files, cfg.format, preprocessing, wavelength, cfg.input_wavelength,
                                      min(batch_size, prediction.READ_ROWS), opts["chunk_size"], result.skipped)
        source = f"input={OmegaConf.to_container(cfg.input) if OmegaConf.is_list(cfg.input) else cfg.input}"
    prediction.stream_predictions(models, tasks, batch_size=batch_size, trust=trust, workers=opts["workers"],
                                  progress=opts["progress"], result=result)
    _check_pass(result, opts["strict"])
    if result.columns.n_rows == 0 or result.n_usable == 0:
        raise prediction.no_usable_pixel(result.sources) if result.columns.n_rows else DataError("no spectra to predict")

    style, names = catalog_names(preprocessing)
    ids, values = result.columns.joined()
    n = len(next(iter(values.values())))
    meta = {**catalog.provenance(members[0], model, preprocessing, style, source), "n_spectra": n,
            "n_skipped": len(result.skipped)}
    if len(members) > 1 or trust.mc_dropout:
        meta["ensemble"] = {"members": [str(m.resolve()) for m in members],
                            "sha256": [catalog.sha256_of(m) for m in members], "mc_dropout": trust.mc_dropout}
    meta.update(flags.header_cards())
    flag_counts = flags.summary(values["flag"])
    log.info("%s (FLAG bits: %s)", flags.describe(flag_counts, n), ", ".join(f"{1 << flags.bit_number(f)} {f.name}"
                                                                          for f in flags.Flag))
    start = time.perf_counter()
    table = catalog.build_table(ids, values, model.label_names, names, meta)
    paths = catalog.write_catalog(table, cfg.output_dir, formats=opts["formats"])
    write_seconds = time.perf_counter() - start
    outside = np.stack([values[f"{label}_outside"] for label in model.label_names], axis=1)
    warning = predict_block.report_outside(model.label_names, outside, tolerance)
    if warning is not None:
        log.warning("%s", warning)
    start = time.perf_counter()
    figures = _figures(values, model.label_names, cfg.output_dir)
    figure_seconds = time.perf_counter() - start
    rate = n / max(result.seconds + write_seconds, 1e-9)
    summary = {"n_spectra": n, "n_files": result.n_files, "n_skipped": len(result.skipped), "skipped": result.skipped,
               "n_outside": int(outside.any(axis=1).sum()), "seconds": round(result.seconds, 3),
               "write_seconds": round(write_seconds, 3), "figure_seconds": round(figure_seconds, 3),
               "spectra_per_second": round(rate, 1), "catalog": {k: str(v) for k, v in paths.items()}, "figures": [str(f) for f in figures],
               "flags": flag_counts, "provenance": meta}
    if "split" in values:
        summary["split"] = {str(k): int(v) for k, v in zip(*np.unique(values["split"], return_counts=True))}
    json_path = catalog.write_summary(cfg.output_dir, summary)
    log.info("predicted %s for %d spectra (%.0f spectra/s read, predicted and written) from %s, %d skipped: %s",
             model.label_names, n, rate, source,
             len(result.skipped), ", ".join(str(p) for p in [*paths.values(), json_path]))
    return {"n_spectra": n, "n_skipped": len(result.skipped), "n_outside": summary["n_outside"], "json": str(json_path),
            **{k: str(v) for k, v in paths.items()}}


def trust_settings(cfg: DictConfig, tolerance: float):
    """The quality-flag and model-uncertainty settings of predict.yaml, each checked by its rule."""
    from stellarlab.checks import Number, _plain
    from stellarlab.results.predict_block import Trust

    values = {}
    for key, rule in (("min_usable_fraction", Number(minimum=0, maximum=1, example="min_usable_fraction=0.5")),
                      ("disagreement_factor", Number(above=0, example="disagreement_factor=2")),
                      ("max_reduced_chi2", Number(above=0, example="max_reduced_chi2=3")),
                      ("mc_dropout", Number(minimum=0, integer=True, allow_null=True, example="mc_dropout=20"))):
        value = _plain(cfg.get(key, getattr(Trust, key)))
        rule.check(key, value)
        values[key] = value
    values["mc_dropout"] = int(values["mc_dropout"] or 0)
    return Trust(tolerance=tolerance, **{k: v if k == "mc_dropout" else float(v) for k, v in values.items()})


def _figures(values: dict, label_names, out_dir) -> list:
    """The catalogue's Kiel diagram and label histograms; a figure that fails is a warning, never the catalogue."""
    from stellarlab.results.plots import write_prediction_figures

    try:
        return write_prediction_figures({name: values[name] for name in label_names}, list(label_names), out_dir)
    except Exception as err:  # noqa: BLE001  (matplotlib, fonts, a full disk: the catalogue is written already)
        log.warning("figures of the catalogue not written (%s: %s)", type(err).__name__, err)
        return []


def _check_pass(result, strict: bool) -> None:
    """Files that could not be read: one error listing all with data.strict=true (or when none could be read),
    else a warning listing them."""
    from stellarlab.errors import DataError

    if not result.skipped:
        return
    bad = result.skipped
    listed = "; ".join(s["error"] for s in bad)
    if strict:
        raise DataError(f"{len(bad)} of {result.n_files} input files cannot be read (data.strict=true); fix or remove "
                        f"them, or set data.strict=false to skip them: {listed}")
    if result.columns.n_rows == 0:
        raise DataError(f"none of the {result.n_files} input files can be read: {listed}")
    log.warning("skipped %d of %d input files that cannot be read (listed in predictions.json; data.strict=true makes "
                "this an error):\n  %s", len(bad), result.n_files, "\n  ".join(s["error"] for s in bad))


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="predict")
def main(cfg: DictConfig) -> dict:
    from stellarlab.run.allocator import apply_command_setting

    with command_errors(log):
        apply_command_setting(cfg.get("malloc_keep_block_mb"))  # blocks of spectra are reused, not faulted in anew
        return run_predict(cfg)


def cli() -> None:
    """`stellarlab-predict` and `python predict.py`."""
    main()


if __name__ == "__main__":
    cli()


__all__ = ["cli", "main", "options", "run_predict"]
