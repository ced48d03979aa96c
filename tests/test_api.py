"""The Python API: repa_probe.analyze on files and on any nn.Module (tuples of streams, extra tokens)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import repa_probe
from conftest import randomize_, run_cli, tiny_config
from repa_probe.capture import capture_blocks, noisy_input
from repa_probe.checkpoints import save_checkpoint
from repa_probe.encoders import load_encoder
from repa_probe.errors import UserError
from repa_probe.models import SiT
from repa_probe.pipeline import AnalyzeConfig, python_arg

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(n=40, bootstrap=2, null=2, k=5, quiet=True)


class JointBlock(nn.Module):
    """An MMDiT-like block: two streams in, (text, image) out, the image stream reading the text."""

    def __init__(self, d: int):
        super().__init__()
        self.img, self.txt = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, hidden_states, encoder_hidden_states):
        image = torch.tanh(self.img(hidden_states)) + encoder_hidden_states.mean(1, True)
        return self.txt(encoder_hidden_states), image


class ToyMMDiT(nn.Module):
    """Patchify 16×16 pixels by 4 (16 image tokens), 5 text tokens, time added to both streams."""

    def __init__(self, d: int = 24, depth: int = 3):
        super().__init__()
        self.embed, self.text = nn.Conv2d(3, d, 4, 4), nn.Parameter(torch.randn(1, 5, d))
        self.time = nn.Linear(1, d)
        self.transformer_blocks = nn.ModuleList(JointBlock(d) for _ in range(depth))

    def forward(self, x, timestep, encoder_hidden_states=None):
        h = self.embed(x).flatten(2).transpose(1, 2) + self.time(timestep[:, None].float())[:, None]
        e = self.text.expand(len(x), -1, -1)
        for block in self.transformer_blocks:
            e, h = block(h, e)
        return h


class ToyRegisters(nn.Module):
    """A ViT-like denoiser whose sequence is [CLS, 2 registers, 16 image tokens]: not a square count."""

    def __init__(self, d: int = 24, depth: int = 2):
        super().__init__()
        self.embed, self.extra = nn.Conv2d(3, d, 4, 4), nn.Parameter(torch.randn(1, 3, d))
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU()) for _ in range(depth)])

    def forward(self, x, timestep, label=None):
        h = self.embed(x).flatten(2).transpose(1, 2) * (1 + timestep[:, None, None].float() / 1000)
        return self.blocks(torch.cat([self.extra.expand(len(x), -1, -1), h], 1))


def hand_pooled(model: nn.Module, blocks: list[nn.Module], x: torch.Tensor, timestep: torch.Tensor, call,
                pick) -> torch.Tensor:
    """[depth + 1, N, D]: the image tokens entering block 1 and leaving every block, averaged over tokens."""
    seen = []
    handles = [blocks[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append(pick(a[0] if a else kw["hidden_states"])), with_kwargs=True)]
    handles += [b.register_forward_hook(lambda m, a, out: seen.append(pick(out))) for b in blocks]
    with torch.no_grad():
        call(model, x, timestep, None)
    for h in handles:
        h.remove()
    return torch.stack([s.mean(1) for s in seen])


def test_mmdit_image_stream_and_register_tokens_are_what_the_blocks_computed():
    torch.manual_seed(0)
    x0, ids = torch.rand(6, 3, 16, 16) * 2 - 1, torch.arange(6)
    mm = ToyMMDiT().eval()
    ckpt = repa_probe.describe_module(mm, blocks="transformer_blocks", convention="sit", image_size=16)
    assert (ckpt.anatomy.grid, ckpt.anatomy.depth, ckpt.anatomy.width, ckpt.anatomy.patch_size) == (4, 3, 24, 4)
    got = capture_blocks(ckpt, x0, None, ids, [0.5], seed=0)[0]
    want = hand_pooled(mm, list(mm.transformer_blocks), *noisy_input(ckpt.convention, x0, ids, 0.5, 0),
                       lambda m, x, t, y: m(x, t),
                       lambda out: out[1] if isinstance(out, tuple) else out)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    reg = ToyRegisters().eval()
    with pytest.raises(UserError, match="not a square grid: pass grid="):
        repa_probe.describe_module(reg, image_size=16)
    ckpt = repa_probe.describe_module(reg, image_size=16, grid=4, convention="dit")
    got = capture_blocks(ckpt, x0, None, ids, [0.5], seed=0)[0]
    want = hand_pooled(reg, list(reg.blocks), *noisy_input(ckpt.convention, x0, ids, 0.5, 0),
                       lambda m, x, t, y: m(x, t), lambda out: out[:, 3:])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_two_equal_length_streams_need_stream_index():
    class Twin(ToyMMDiT):
        def forward(self, x, timestep, y=None):
            h = self.embed(x).flatten(2).transpose(1, 2)
            e = h.flip(1)
            for block in self.transformer_blocks:
                e, h = block(h, e)
            return h
    with pytest.raises(UserError, match="stream=INDEX"):
        ckpt = repa_probe.describe_module(Twin().eval(), blocks="transformer_blocks", image_size=16)
        capture_blocks(ckpt, torch.zeros(2, 3, 16, 16), None, torch.arange(2), [0.5], seed=0)
    ckpt = repa_probe.describe_module(Twin().eval(), blocks="transformer_blocks", image_size=16, stream=1)
    assert capture_blocks(ckpt, torch.zeros(2, 3, 16, 16), None, torch.arange(2), [0.5], seed=0).shape == (1, 4, 2, 24)


def test_a_module_and_its_checkpoint_file_give_identical_numbers(tmp_path, cifar_dir):
    """The notebook path (an nn.Module described by blocks=/call=) and the file path (the SiT family) see the
    same images and noise, so every model and raw-input row agrees exactly; the comparison of the two is 0."""
    cfg = tiny_config(z_dims=[], encoder_depth=0)
    model = randomize_(SiT(cfg), seed=3).eval()
    path = save_checkpoint(tmp_path / "sit.pt", cfg, model.state_dict(), meta={"step": 7, "mode": "pixels"})
    common = dict(data=str(cifar_dir / "test"), encoders=["cifar-ssl-resnet"], ts=[0, 0.5], cache=str(tmp_path / "c"),
                  **FAST)
    from_file = repa_probe.analyze(str(path), **common)
    convention = from_file.results.models[0].ckpt.provenance.convention
    in_memory = repa_probe.analyze(model, blocks="blocks", convention=convention, image_size=16, num_classes=10,
                                   name="notebook", **common)
    a, b = from_file.table, in_memory.table
    for kind in ("model", "raw-input"):
        x, y = a[a["kind"] == kind], b[b["kind"] == kind]
        assert len(x) == len(y) > 0
        np.testing.assert_array_equal(x["value"].to_numpy(), y["value"].to_numpy())
    assert set(a["metric"]) == {"cknna", "probe_top1", "self_cka_prev", "self_cka_tmin"}

    both = repa_probe.analyze([str(path), model], blocks="blocks", image_size=16, num_classes=10, name="notebook",
                              convention=convention, **common)
    deltas = pd_deltas(both)
    assert len(deltas) and np.allclose(deltas["delta"], 0) and list(both.summary["compare"][0].values())[:2] == \
        ["sit", "notebook"]
    out = both.report(tmp_path / "report")
    assert (out / "report.pdf").stat().st_size > 0 and (out / "summary.json").is_file()


def pd_deltas(analysis):
    from repa_probe.report.compose import summarise
    return summarise(analysis.results)[1]["deltas"]


def test_bad_api_input_is_one_clear_error(tmp_path, cifar_dir):
    with pytest.raises(UserError, match="unknown option"):
        repa_probe.analyze(str(tmp_path / "x.pt"), data=str(cifar_dir / "test"), bootstrapp=3)
    with pytest.raises(UserError, match="only for an nn.Module"):
        repa_probe.analyze(str(tmp_path / "x.pt"), data=str(cifar_dir / "test"), blocks="blocks")
    with pytest.raises(UserError, match="does not exist"):
        repa_probe.analyze(str(tmp_path / "x.pt"), data=str(cifar_dir / "test"))
    with pytest.raises(UserError, match="has no attribute path 'layers'"):
        repa_probe.describe_module(ToyRegisters(), blocks="layers", image_size=16)
    with pytest.raises(UserError, match="cannot analyse a int"):
        repa_probe.analyze(3, data=str(cifar_dir / "test"))


def test_a_missing_checkpoint_is_named_before_any_encoder_loads(tmp_path, cifar_dir):
    """Files are looked for before the encoders load (a typo costs no DINOv2 load): with an encoder whose
    weight file is not a weight file, the error names the missing checkpoint, not the encoder's file."""
    junk = tmp_path / "teacher.safetensors"
    junk.write_bytes(b"not a weight file")
    for models in (str(tmp_path / "typo.pt"), [str(tmp_path / "typo.pt")]):
        with pytest.raises(UserError, match="typo.pt"):
            repa_probe.analyze(models, data=str(cifar_dir / "test"), encoders=[f"cifar-ssl-resnet={junk}"])
    result = run_cli("analyze", tmp_path / "typo.pt", "--data", cifar_dir / "test", "--encoder",
                     f"cifar-ssl-resnet={junk}", "--out", tmp_path / "out")
    assert result.returncode != 0 and "typo.pt" in result.stderr and "teacher.safetensors" not in result.stderr
    with pytest.raises(UserError, match="teacher.safetensors"):           # what loading it would have said
        load_encoder(f"cifar-ssl-resnet={junk}")


def test_python_arguments_get_the_command_lines_checks_and_errors_in_python_terms(tmp_path, cifar_dir):
    """Each bad argument: one UserError naming it as Python spells it (`data=`, not `--data`), raised before any
    image is read; one encoder, model, name or noise level may be given alone."""
    path, data = str(tmp_path / "x.pt"), str(cifar_dir / "test")
    bad = [(dict(models=[]), "models=[]"), (dict(ts="0"), "ts='0'"), (dict(ts=0.5, n="20"), "n='20'"),
           (dict(ts=[0, 1.5]), "ts=(0, 1.5)"), (dict(n=True), "n=True"), (dict(probe="no"), "probe='no'"),
           (dict(data=None), "data=None"), (dict(data=str(tmp_path / "none")), "data=..."),
           (dict(probe_train=data), "probe_train=... and probe_test=... go together"),
           (dict(encoders=3), "encoders=3"), (dict(alignment_metrics="cka2"), "alignment_metrics='cka2'"),
           (dict(n=100_000), "n=100000: choose between 1 and the 10000 images in data=..."),
           (dict(names=["a", "b"]), "names=['a', 'b'] gives 2 name(s) for 1 model(s)"),
           (dict(n=20, encoders="cifar-ssl-resnet"), "n=20 is too few for k=10: a bootstrap subsample (bootstrap=20)")]
    for kwargs, message in bad:
        kwargs = {"models": path, "data": data, **kwargs}
        with pytest.raises(UserError) as e:
            repa_probe.analyze(kwargs.pop("models"), **kwargs)
        assert message in str(e.value) and "--" not in str(e.value), (kwargs, str(e.value))
    # a string is one encoder, a number one noise level: both pass the checks and reach the encoder's loading
    with pytest.raises(UserError, match="unknown encoder 'no-such-encoder'"):
        repa_probe.analyze(path, data=data, encoders="no-such-encoder", ts=0.5)
    model = SiT(tiny_config(z_dims=[], encoder_depth=0))
    with pytest.raises(UserError, match=r"^image_size='32' must be an integer ≥ 1$"):
        repa_probe.analyze(model, data=data, image_size="32")
    with pytest.raises(UserError, match=r"report\(out=None\): pass the folder"):
        repa_probe.Analysis(results=None, seconds=0.0).report(None)
    for enough in (dict(n=21), dict(k=9), dict(bootstrap=0)):    # what the n-for-k error advises is enough
        AnalyzeConfig(**{"data": data, "n": 20, "encoders": ["cifar-ssl-resnet"], **enough}).resolved(python_arg)
