"""A fuzz test of the command line: hostile flag values for every command must end in exit 0 or 2, never a
traceback, at most one error line, no file changed outside --out/--cache and nothing left half-written.

Each example takes one command, fills its required flags with small valid fixtures, and makes one to three
flags hostile (0, negatives, NaN, inf, huge, empty, wrong types, missing, unreadable or read-only paths).
The CLI runs in this process (`repa_probe.cli.main`, the same code `repa-probe` runs) so that a few hundred
inputs fit in a minute; the other tests run it in real subprocesses."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import randomize_, tiny_config
from repa_probe.checkpoints import save_checkpoint
from repa_probe.cli import main
from repa_probe.models import SiT

NUMBERS = ["0", "-1", "-4", "nan", "inf", "-inf", "", "abc", "1e999", "3.5", "99999999999999999999", "0x10"]
LENGTHS = [v for v in NUMBERS if v != "99999999999999999999"]   # a huge run length is valid: it just takes long
T_LISTS = ["", ",", "0.5,0.5", "-0.1", "1.5", "nan", "a,b", "0;0.5", "1e9"]
PATHS = ["MISSING", "UNREADABLE", "A_FILE", "EMPTY_DIR", ""]
OUT_PATHS = ["UNDER_A_FILE", "READ_ONLY", ""]

COMMON_ANALYSIS = {"--n": NUMBERS, "--k": NUMBERS, "--bootstrap": NUMBERS, "--null": NUMBERS, "--samples": NUMBERS,
                   "--probe-n-train": NUMBERS, "--probe-n-test": NUMBERS, "--batch-size": NUMBERS,
                   "--workers": NUMBERS, "--heads": NUMBERS, "--seed": ["", "abc", "1.5"], "--t": T_LISTS,
                   "--data": PATHS, "--probe-train": PATHS, "--cache": OUT_PATHS, "--out": OUT_PATHS,
                   "--metrics": ["", "nope", "cknna,,", "cknna,nope"],
                   "--device": ["gpu0", "cuda", "cuda:7", "tpu", ""],
                   "--convention": ["edm", ""], "--encoder": ["dinov3-vit-b", "test_vit=MISSING", ""],
                   "--encoder-precision": ["fp16", "BF16", ""]}
COMMANDS = {
    "inspect": {"--convention": ["edm", ""], "--weights": ["ema2", ""], "--heads": NUMBERS, "CHECKPOINT": PATHS},
    "extract": {"--num-images": NUMBERS, "--subset-seed": ["abc"], "--t": T_LISTS, "--batch-size": NUMBERS,
                "--workers": NUMBERS, "--pooling": ["grid:0", "grid:x", "max", ""], "--data": PATHS,
                "--cache": OUT_PATHS, "--device": ["gpu0", "cuda"], "CHECKPOINT": PATHS},
    "analyze": {**COMMON_ANALYSIS, "CHECKPOINT": PATHS},
    "compare": {**COMMON_ANALYSIS, "CHECKPOINT": PATHS},
    "trajectory": {**COMMON_ANALYSIS, "--source": ["logs", ""], "CHECKPOINT": PATHS},
    "train": {"--image-size": NUMBERS, "--depth": NUMBERS, "--width": NUMBERS, "--heads": NUMBERS,
              "--batch": NUMBERS, "--steps": LENGTHS, "--lr": NUMBERS, "--weight-decay": NUMBERS,
              "--grad-clip": NUMBERS, "--ema-decay": NUMBERS + ["1.5"], "--cfg-prob": NUMBERS + ["1.5"],
              "--repa-coeff": NUMBERS, "--repa-depth": NUMBERS, "--projector-dim": NUMBERS,
              "--ckpt-every": LENGTHS, "--log-every": LENGTHS, "--analyze-every": LENGTHS, "--analyze-n": NUMBERS,
              "--analyze-t": T_LISTS, "--analyze-blocks": ["0", "1,1", "a", ""], "--workers": NUMBERS,
              "--model": ["SiT-Q/2", "DiT-S/3", ""], "--data": PATHS, "--out": OUT_PATHS,
              "--resume": PATHS, "--device": ["gpu0", "cuda"], "--encoder": ["dinov3-vit-b", ""]},
    "sample": {"--n": NUMBERS, "--cfg": NUMBERS, "--cfg-interval": ["0.8,0.2", "a,b", "0", "-1,2"],
               "--steps": NUMBERS, "--class-label": NUMBERS, "--sampler": ["euler", ""], "--out": OUT_PATHS,
               "CHECKPOINT": PATHS},
    "demo": {"--steps": NUMBERS, "--n": NUMBERS, "--data": PATHS, "--out": OUT_PATHS, "--device": ["gpu0", "cuda"]},
    "encoders": {"--grid": NUMBERS},
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, cifar_dir):
    """Small valid fixtures, and hostile paths: missing, unreadable, a file, an empty folder, a read-only one."""
    root = tmp_path_factory.mktemp("fuzz")
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    save_checkpoint(root / "ok.pt", cfg, randomize_(SiT(cfg)).state_dict(), meta={"mode": "pixels", "step": 3})
    data = root / "data"
    for c in ("cat", "dog"):
        (data / c).mkdir(parents=True)
        for f in sorted((cifar_dir / "test" / c).iterdir())[:12]:
            shutil.copy(f, data / c / f.name)
    (root / "a_file").write_text("not a folder, not a checkpoint")
    (root / "empty_dir").mkdir()
    (root / "unreadable").write_bytes(b"\x00" * 64)
    (root / "unreadable").chmod(0o000)
    (root / "read_only").mkdir()
    (root / "read_only").chmod(0o555)
    yield root
    (root / "read_only").chmod(0o755)


def hostile(value: str, root: Path) -> str:
    return {"MISSING": str(root / "missing" / "nothing.pt"), "UNREADABLE": str(root / "unreadable"),
            "A_FILE": str(root / "a_file"), "EMPTY_DIR": str(root / "empty_dir"),
            "UNDER_A_FILE": str(root / "a_file" / "out"), "READ_ONLY": str(root / "read_only" / "out"),
            "test_vit=MISSING": f"test_vit={root / 'missing.pth'}"}.get(value, value)


def valid(command: str, root: Path) -> dict[str, str | None]:
    """Required and cheap flags, valid: a hostile one drawn below replaces its entry."""
    data, out = str(root / "data"), str(root / "runs" / "out")
    base = {"CHECKPOINT": str(root / "ok.pt")}
    analysis = {**base, "--data": data, "--out": out, "--cache": str(root / "runs" / "cache"), "--n": "16",
                "--t": "0", "--bootstrap": "0", "--null": "0", "--encoder": "test_vit", "--quiet": None,
                "--encoder-random-init": None}
    return {"inspect": base, "extract": {**base, "--data": data, "--cache": str(root / "runs" / "cache"),
                                         "--num-images": "8", "--t": "0", "--quiet": None},
            "analyze": analysis, "compare": analysis, "trajectory": analysis,
            "train": {"--data": data, "--out": out, "--steps": "1", "--batch": "4", "--depth": "1", "--width": "32",
                      "--heads": "2", "--image-size": "16", "--repa-coeff": "0", "--workers": "0", "--quiet": None},
            "sample": {**base, "--out": str(root / "runs" / "s.png"), "--n": "2", "--steps": "1"},
            "demo": {"--data": str(root / "missing"), "--out": out, "--steps": "1", "--n": "16", "--quiet": None},
            "encoders": {}}[command]


def argv_of(command: str, flags: dict[str, str | None]) -> list[str]:
    argv = [command]
    if "CHECKPOINT" in flags:
        argv.append(flags["CHECKPOINT"])
        if command == "compare":
            argv.append(flags["CHECKPOINT"])
    for flag, value in flags.items():
        if flag != "CHECKPOINT":
            argv += [flag] if value is None else [flag, value]
    return argv


def writable_places(argv: list[str]) -> list[Path]:
    """Where the command may write: its --out and --cache (whatever they were set to)."""
    return [Path(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a in ("--out", "--cache") and argv[i + 1]]


def snapshot(root: Path, allowed: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file outside the allowed places, with its size and modification time."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and os.access(p, os.R_OK) and not any(p.is_relative_to(a) for a in allowed):
            out[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns)
    return out


INPUTS = []


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_flags_end_in_exit_0_or_2_with_one_line_and_nothing_half_written(sandbox, data):
    command = data.draw(st.sampled_from(sorted(COMMANDS)))
    choices = COMMANDS[command]
    chosen = data.draw(st.lists(st.sampled_from(sorted(choices)), min_size=1, max_size=3, unique=True))
    flags = valid(command, sandbox)
    for flag in chosen:
        flags[flag] = hostile(data.draw(st.sampled_from(choices[flag])), sandbox)
    argv = argv_of(command, flags)
    INPUTS.append(argv)
    if os.environ.get("FUZZ_LOG"):
        with Path(os.environ["FUZZ_LOG"]).open("a") as log:
            log.write(f"{__import__('time').time():.1f} " + " ".join(argv) + "\n")
    allowed = writable_places(argv)
    before = snapshot(sandbox, allowed)
    err, out = io.StringIO(), io.StringIO()
    threads, cwd = torch.get_num_threads(), os.getcwd()
    os.chdir(sandbox)                    # a stray relative write lands where the snapshot sees it
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        finally:
            os.chdir(cwd)
    torch.set_num_threads(threads)
    lines = [line for line in err.getvalue().splitlines() if line.strip() and not line.startswith("\r")]
    assert code in (0, 2), (argv, code, err.getvalue()[-1500:])
    assert "Traceback" not in err.getvalue(), (argv, err.getvalue()[-1500:])
    if code == 2:
        assert len(lines) == 1 and "error" in lines[0], (argv, err.getvalue())
    assert snapshot(sandbox, allowed) == before, argv              # nothing outside --out / --cache changed
    leftovers = [p for p in sandbox.rglob("*") if p.name.endswith(".tmp") or ".partial-" in p.name]
    assert not leftovers, (argv, leftovers)
    for place in [sandbox / "runs", *allowed]:
        if place.is_relative_to(sandbox) and place.is_dir() and place not in (sandbox / "data", sandbox):
            shutil.rmtree(place, ignore_errors=True)


def test_the_fuzz_tried_many_distinct_inputs():
    """Reported in the closing note of the change that added the fuzz: how many inputs it tried."""
    distinct = {tuple(a) for a in INPUTS}
    print(f"fuzz: {len(INPUTS)} inputs, {len(distinct)} distinct, over {len({a[0] for a in INPUTS})} commands")
    assert len(distinct) >= 100 and len({a[0] for a in INPUTS}) == len(COMMANDS)
