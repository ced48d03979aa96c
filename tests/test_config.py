"""Each knob is declared once (config.knob): the parsers are generated from the declarations, the checks of
configs made in Python read the same bounds, and what a resume must keep is the fields marked resume=True.
Real parsers, real training runs and checkpoints, the CLI in real subprocesses."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import ONE_THREAD, run_cli
from repa_probe.cli import build_parser, config_from_args
from repa_probe.config import AnalyzeConfig, check_knobs, cli_arg, flag_of, knob_of
from repa_probe.errors import UserError
from repa_probe.train.trainer import RESUME_MUST_MATCH, TrainConfig, resume_differences
from test_train import tiny_flags

# the arguments that are no config's field, said once each in cli.py
EXPLICIT = {"help", "checkpoint", "checkpoints", "sources", "source", "out", "pixels", "latents"}


def subparsers() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices


def knob_flags(cls) -> dict[str, tuple[str, str | None]]:
    """dest → (flag, help) of every knob of `cls` on the command line, nested configs' as FIELD.NAME."""
    out = {}
    for f in dataclasses.fields(cls):
        k = knob_of(f)
        if k.nest:
            inner = {g.name: g for g in dataclasses.fields(AnalyzeConfig)}
            out.update({f"{f.name}.{n}": (f"--{k.prefix}-{flag_of(inner[n])[2:]}",
                                          k.helps.get(n, knob_of(inner[n]).help)) for n in k.nest})
        elif k.cli:
            out[f.name] = (flag_of(f), k.help)
    return out


@pytest.mark.parametrize("command, cls", [("analyze", AnalyzeConfig), ("compare", AnalyzeConfig),
                                          ("trajectory", AnalyzeConfig), ("train", TrainConfig)])
def test_every_knob_has_exactly_one_flag_with_its_declared_help(command, cls):
    parser = subparsers()[command]
    explicit = EXPLICIT - {f.name for f in dataclasses.fields(cls)}
    actions = [a for a in parser._actions if a.dest not in explicit]
    knobs = knob_flags(cls)
    if cls is TrainConfig:
        del knobs["mode"]                              # --pixels / --latents VAE, explicit in cli.py
    by_dest = {}
    for a in actions:
        assert a.dest not in by_dest, f"{command}: two arguments set {a.dest}"
        by_dest[a.dest] = a
    assert set(by_dest) == set(knobs), (command, set(by_dest) ^ set(knobs))
    for dest, (flag, help) in knobs.items():
        a = by_dest[dest]
        assert a.option_strings[0] == flag and (a.help or None) == (help and help.replace(
            "%(choices)s", ", ".join(knob_of(next(f for f in dataclasses.fields(AnalyzeConfig)
                                                  if f.name == "alignment_metrics")).names()))), (command, dest)
    text = parser.format_help()
    for flag, _ in knobs.values():
        assert text.count(f"\n  {flag} ") + text.count(f"\n  {flag}\n") + text.count(f"\n  {flag},") == 1, flag


def test_the_parser_and_the_python_checks_read_the_same_bounds(cifar_dir, tmp_path):
    """A value the parser refuses is refused in Python too, naming the same flag; one it takes passes both."""
    parse = subparsers()["analyze"].parse_args
    base = ["CK", "--data", str(cifar_dir / "test"), "--out", str(tmp_path)]
    for name, bad, good in (("k", 0, 5), ("bootstrap", 10_001, 3), ("seed", -1, 7), ("num_workers", -1, 0),
                            ("heads", 0, 2)):
        flag = cli_arg(name)
        with pytest.raises(SystemExit):
            parse([*base, flag, str(bad)])
        with pytest.raises(UserError, match=f"^{flag} {bad} must be"):
            check_knobs(AnalyzeConfig(data="d", **{name: bad}), cli_arg)
        assert getattr(parse([*base, flag, str(good)]), name) == good
        check_knobs(AnalyzeConfig(data="d", **{name: good}), cli_arg)


def changed(value):
    """A different value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return value + ["other"]
    return 3                                          # None: an optional number (depth, heads, num_classes, ...)


def test_every_field_marked_resume_and_only_those_is_refused_on_resume(cifar_dir):
    saved = TrainConfig(data=str(cifar_dir / "train"), encoders=["test_vit"])
    assert RESUME_MUST_MATCH == tuple(f.name for f in dataclasses.fields(TrainConfig) if knob_of(f).resume)
    assert {"data", "model", "lr", "seed", "batch", "repa_coeff"} <= set(RESUME_MUST_MATCH)
    for f in dataclasses.fields(TrainConfig):
        now = dataclasses.replace(saved, **{f.name: changed(getattr(saved, f.name))}) if f.name != "analysis" else \
            dataclasses.replace(saved, analysis=dataclasses.replace(saved.analysis, n=7))
        differ = resume_differences(saved.to_dict(), now)
        assert [d.split(":")[0] for d in differ] == ([f.name] if f.name in RESUME_MUST_MATCH else []), f.name
    spelled = dataclasses.replace(saved, data=str(cifar_dir / "train") + "/")     # the same folder, spelled apart
    assert resume_differences(saved.to_dict(), spelled) == []


def old_layout(train_config: dict) -> dict:
    """A train_config as recorded before TrainConfig held an AnalyzeConfig: flat analyze_* settings."""
    old = {k: v for k, v in train_config.items() if k != "analysis"}
    a = train_config["analysis"]
    old.update(analyze_data=a["data"], analyze_n=a["n"], analyze_blocks=list(a["blocks"] or []),
               analyze_t=list(a["ts"]), analyze_k=a["k"], analyze_metrics=list(a["alignment_metrics"]),
               analyze_batch=a["batch_size"])
    return old


def test_a_checkpoint_recorded_the_old_way_resumes_and_refuses_other_settings(cifar_dir, tmp_path):
    from repa_probe.checkpoints import read_checkpoint
    from repa_probe.runtime import torch_save_atomic
    run = tmp_path / "run"
    flags = tiny_flags(cifar_dir / "test", run, **{"--repa-coeff": 0, "--ckpt-every": 2, "--analyze-n": 50,
                                                   "--analyze-t": "0.5", "--analyze-k": 5})
    assert run_cli("train", *flags, "--steps", 2, env=ONE_THREAD).returncode == 0
    path = run / "checkpoints" / "0000002.pt"
    obj = read_checkpoint(path)
    recorded = obj["meta"]["train_config"]
    assert recorded["analysis"]["n"] == 50 and not any(k.startswith("analyze_") and k != "analyze_every"
                                                       for k in recorded)
    obj["meta"]["train_config"] = old_layout(recorded)
    torch_save_atomic(path, obj)
    back = TrainConfig.from_dict(read_checkpoint(path)["meta"]["train_config"])
    assert back.analysis == TrainConfig.from_dict(recorded).analysis and back.analysis.ts == (0.5,)
    assert back == TrainConfig.from_dict(recorded)

    r = run_cli("train", *flags, "--steps", 3, "--lr", "0.002", env=ONE_THREAD)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "settings differ (lr: checkpoint 0.001, now 0.002)" in lines[0]
    r = run_cli("train", *flags, "--steps", 4, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "0000004.pt", weights_only=True)["step"] == 4


def test_the_knobs_marked_cache_are_what_the_capture_keys_on():
    """AnalyzeConfig.capture() is read from cache=True: every setting of the capture's key but extract's own
    (pooling, storage dtype) comes from exactly those knobs, with their values."""
    from repa_probe.capture import CaptureConfig
    marked = {f.name for f in dataclasses.fields(AnalyzeConfig) if knob_of(f).cache}
    assert marked == {f.name for f in dataclasses.fields(CaptureConfig)} - {"pooling", "dtype", "reductions"}
    cfg = AnalyzeConfig(data="d", ts=(0.5,), seed=3, labels="true", precision="bf16", blocks=(1, 2), spatial=True,
                        tokens=True, compile=True)
    capture = cfg.capture()
    assert {name: getattr(capture, name) for name in marked} == {name: getattr(cfg, name) for name in marked}
    assert capture.key() != dataclasses.replace(cfg, seed=4).capture().key()
    assert capture.reductions == ("spatial", "tokens", "projected")     # what --spatial and --tokens measure


@pytest.mark.parametrize("command", ["analyze", "compare", "trajectory"])
def test_the_command_lines_defaults_are_pythons(command):
    """A flag left out means what the keyword left out means: one default per knob. (The command line once
    defaulted --vae to SD-VAE, so LightningDiT and REPA-E latents were silently encoded with the wrong VAE.)"""
    parser = subparsers()[command]
    needed = {"analyze": ["x.pt"], "compare": ["x.pt", "y.pt"], "trajectory": ["run"]}[command]
    args = parser.parse_args([*needed, "--data", "d", "--out", "o"])
    assert config_from_args(AnalyzeConfig, args) == AnalyzeConfig(data="d")
