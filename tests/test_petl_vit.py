"""PETL-ViT 1-bit checkpoints (.bin) read into BinaryWeights and written back."""
import os
import struct
from pathlib import Path

import pytest
import torch

from shira_kernels.formats import BinaryWeight
from shira_kernels.io import PetlVitCheckpoint, load_petl_vit, petl_vit_layout, save_petl_vit
from shira_kernels.quant import PETL_LEVEL


def _fixture_dir() -> Path:
    """SHIRA_FIXTURES may name the fixtures root (holding petl_vit/) or petl_vit/ itself."""
    override = os.environ.get("SHIRA_FIXTURES")
    if override:
        root = Path(override)
        return root / "petl_vit" if (root / "petl_vit").is_dir() else root
    return Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "petl_vit"


FIXTURES = _fixture_dir()
NAMES = ("lora-bihead_cifar-bit1-dim32", "adaptformer-bihead_dtd-bit1-dim1")


def _scalar(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("'\"")


def read_config(path: Path) -> dict:
    """The flat `key: value` yaml of the release, without a yaml dependency."""
    config = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(":")
            config[key.strip()] = _scalar(value.strip())
    return config


@pytest.fixture(params=NAMES)
def fixture(request):
    if not FIXTURES.is_dir():
        pytest.skip(f"PETL-ViT fixtures folder not found at {FIXTURES} (set SHIRA_FIXTURES "
                    "to the fixtures root or to its petl_vit/ folder)")
    bin_path = FIXTURES / f"{request.param}.bin"
    return bin_path, read_config(FIXTURES / f"{request.param}.yaml")


@pytest.fixture
def lora_config():
    return {"method": "lora-bihead", "dim": 4, "num_class": 10, "bit": 1,
            "backbone": "vit_base_patch16_224_in21k"}


# -- layout ---------------------------------------------------------------------------------------
def test_layout_lora_and_adaptformer(lora_config):
    layout = petl_vit_layout(lora_config)
    assert len(layout) == 12 * 4 + 1
    assert layout[:4] == [("blocks.0.attn.q.down", (4, 768)), ("blocks.0.attn.q.up", (768, 4)),
                          ("blocks.0.attn.v.down", (4, 768)), ("blocks.0.attn.v.up", (768, 4))]
    assert layout[-2][0] == "blocks.11.attn.v.up" and layout[-1] == ("head", (10, 768))
    plain = petl_vit_layout({"method": "adaptformer", "dim": 8, "bit": 1})
    assert len(plain) == 12 * 2
    assert plain[:2] == [("blocks.0.adapter.down", (8, 768)), ("blocks.0.adapter.up", (768, 8))]


@pytest.mark.parametrize("change, field", [
    ({"method": "vpt"}, "method"), ({"bit": 2}, "bit"), ({"bit": None}, "bit"),
    ({"dim": 0}, "dim"), ({"dim": -3}, "dim"), ({"dim": 2.5}, "dim"), ({"dim": None}, "dim"),
    ({"num_class": 0}, "num_class"), ({"backbone": "vit_large_patch16_224"}, "backbone")])
def test_bad_config_rejected(lora_config, change, field):
    config = {**lora_config, **change}
    with pytest.raises(ValueError, match=field):
        petl_vit_layout(config)


def test_missing_field_rejected(lora_config):
    del lora_config["num_class"]
    with pytest.raises(ValueError, match="num_class"):
        petl_vit_layout(lora_config)


# -- the fixtures ---------------------------------------------------------------------------------
def _matrix_nbytes(shape):
    return (shape[0] * shape[1] + 7) // 8 + 8


def test_layout_matches_file_size(fixture):
    path, config = fixture
    layout = petl_vit_layout(config)
    assert sum(_matrix_nbytes(s) for _, s in layout) == path.stat().st_size
    expected_modules = {"lora-bihead": 12 * 4 + 1, "adaptformer-bihead": 12 * 2 + 1}
    assert len(layout) == expected_modules[config["method"]]


def test_load_shapes_and_stats(fixture):
    path, config = fixture
    ckpt = load_petl_vit(path, config)
    assert isinstance(ckpt, PetlVitCheckpoint)
    layout = petl_vit_layout(config)
    assert list(ckpt.weights) == [n for n, _ in layout] == list(ckpt.stats)
    raw = path.read_bytes()
    offset = 0
    for name, shape in layout:
        w = ckpt.weights[name]
        assert isinstance(w, BinaryWeight) and w.shape == shape
        assert w.alpha.shape == (1,) and w.mu.shape == (1,)
        offset += _matrix_nbytes(shape) - 8
        mean, std = struct.unpack("<ff", raw[offset:offset + 8])
        offset += 8
        assert ckpt.stats[name] == (mean, std)
        assert torch.isfinite(torch.tensor([mean, std])).all() and std > 0
        assert float(w.mu) == mean
        assert torch.equal(w.alpha, torch.tensor([PETL_LEVEL * std], dtype=torch.float32))
    assert offset == len(raw)
    assert ckpt.config["method"] == config["method"]


def test_first_signs_match_raw_bits(fixture):
    path, config = fixture
    ckpt = load_petl_vit(path, config)
    first_name, (_, cols) = petl_vit_layout(config)[0]
    raw = path.read_bytes()
    by_hand = [bool((raw[i // 8] >> (i % 8)) & 1) for i in range(16)]
    flat = ckpt.weights[first_name].signs().reshape(-1)
    assert flat[:16].tolist() == by_hand
    # The stream runs across rows: the second row of the head starts at bit 768 of its block.
    head_offset = sum(_matrix_nbytes(s) for n, s in petl_vit_layout(config)[:-1])
    head_row1 = [bool((raw[head_offset + (768 + i) // 8] >> ((768 + i) % 8)) & 1)
                 for i in range(16)]
    assert ckpt.weights["head"].signs()[1, :16].tolist() == head_row1


def test_dequantize_is_mean_plus_std_level(fixture):
    path, config = fixture
    ckpt = load_petl_vit(path, config)
    for name in (n for n, _ in petl_vit_layout(config)[::7]):
        w = ckpt.weights[name]
        mean, std = ckpt.stats[name]
        level = torch.where(w.signs(), PETL_LEVEL, -PETL_LEVEL).double()
        expected = mean + std * level
        torch.testing.assert_close(w.dequantize().double(), expected, rtol=1e-6, atol=1e-7)


def test_write_back_is_byte_identical(fixture, tmp_path):
    path, config = fixture
    ckpt = load_petl_vit(path, config)
    out = tmp_path / "copy.bin"
    save_petl_vit(out, ckpt, config)
    assert out.read_bytes() == path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["copy.bin"]  # no temporary left behind


def test_write_from_weights_only_round_trips_alpha_mu(fixture, tmp_path):
    path, config = fixture
    ckpt = load_petl_vit(path, config)
    out = tmp_path / "weights.bin"
    save_petl_vit(out, dict(ckpt.weights), config)
    raw, written = path.read_bytes(), out.read_bytes()
    assert len(written) == len(raw)
    again = load_petl_vit(out, config)
    for name, w in ckpt.weights.items():
        v = again.weights[name]
        assert torch.equal(v.packed, w.packed)
        assert torch.equal(v.mu, w.mu) and torch.equal(v.alpha, w.alpha)
        # std may differ in the last bit only.
        std0, std1 = ckpt.stats[name][1], again.stats[name][1]
        assert abs(std1 - std0) <= abs(std0) * 2.0 ** -22


@pytest.mark.parametrize("change, message", [(-1, "truncated"), (+1, "1 bytes too many")])
def test_wrong_size_rejected(fixture, tmp_path, change, message):
    path, config = fixture
    raw = path.read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(raw[:-1] if change < 0 else raw + b"\0")
    expected = f"expected {len(raw)} bytes .*{config['method']}.* has {len(raw) + change} bytes"
    with pytest.raises(ValueError, match=expected) as info:
        load_petl_vit(bad, config)
    assert message in str(info.value)


def test_wrong_config_for_file_rejected(fixture):
    path, config = fixture
    with pytest.raises(ValueError, match="expected .* bytes"):
        load_petl_vit(path, {**config, "dim": config["dim"] + 1})


# -- writer checks (synthetic, small) -------------------------------------------------------------
def _random_weights(config, per_row=()):
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, (rows, cols) in petl_vit_layout(config):
        signs = torch.rand(rows, cols, generator=gen) < 0.5
        if name in per_row:
            weights[name] = BinaryWeight.from_signs(signs, torch.full((rows,), 0.1),
                                                    torch.zeros(rows))
        else:
            weights[name] = BinaryWeight.from_signs(signs, 0.05, -0.01)
    return weights


def test_synthetic_round_trip(tmp_path, lora_config):
    weights = _random_weights(lora_config)
    out = tmp_path / "synthetic.bin"
    save_petl_vit(out, weights, lora_config)
    back = load_petl_vit(out, lora_config)
    for name, w in weights.items():
        assert torch.equal(back.weights[name].signs(), w.signs())
        assert torch.equal(back.weights[name].alpha, w.alpha)
        assert torch.equal(back.weights[name].mu, w.mu)


def test_per_row_weight_rejected(tmp_path, lora_config):
    weights = _random_weights(lora_config, per_row={"blocks.3.attn.v.up"})
    out = tmp_path / "per_row.bin"
    with pytest.raises(ValueError, match=r"blocks\.3\.attn\.v\.up.*per row"):
        save_petl_vit(out, weights, lora_config)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_writer_checks_shapes_and_modules(tmp_path, lora_config):
    weights = _random_weights(lora_config)
    weights["blocks.0.attn.q.down"] = BinaryWeight.from_signs(
        torch.ones(5, 768, dtype=torch.bool), 0.1, 0.0)
    out = tmp_path / "bad.bin"
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q\.down.*\(5, 768\)"):
        save_petl_vit(out, weights, lora_config)
    del weights["head"]
    with pytest.raises(ValueError, match="missing.*head"):
        save_petl_vit(out, weights, lora_config)
    with pytest.raises(ValueError, match="bit"):
        save_petl_vit(out, _random_weights(lora_config), {**lora_config, "bit": 2})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_existing_file(tmp_path, lora_config):
    out = tmp_path / "keep.bin"
    out.write_bytes(b"old")
    weights = _random_weights(lora_config, per_row={"head"})
    with pytest.raises(ValueError):
        save_petl_vit(out, weights, lora_config)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["keep.bin"]


def test_explicit_stats_must_agree(tmp_path, lora_config):
    weights = _random_weights(lora_config)
    with pytest.raises(ValueError, match="do not agree"):
        save_petl_vit(tmp_path / "x.bin", weights, lora_config, stats={"head": (0.0, 1.0)})


# -- bad stats in a file --------------------------------------------------------------------------
def _stats_offset(config, module):
    """Byte offset of ``module``'s (mean, std) in a file for ``config``."""
    offset = 0
    for name, shape in petl_vit_layout(config):
        offset += _matrix_nbytes(shape)
        if name == module:
            return offset - 8
    raise KeyError(module)


@pytest.mark.parametrize("mean, std, what", [
    (0.0, float("nan"), "std"), (0.0, float("inf"), "std"), (0.0, float("-inf"), "std"),
    (0.0, 0.0, "std"), (0.0, -0.0, "std"), (0.0, -0.05, "std"), (float("nan"), 0.05, "mean"),
    (float("inf"), 0.05, "mean"), (float("-inf"), 0.05, "mean"), (3.0e38, 1.0e38, "overflow")],
    ids=repr)
def test_bad_stats_in_a_file_are_refused_naming_the_module(tmp_path, lora_config, mean, std,
                                                           what):
    # Regression: these loaded, giving NaN/Inf/zero/negative α or μ.
    path = tmp_path / "stats.bin"
    save_petl_vit(path, _random_weights(lora_config), lora_config)
    module = "blocks.5.attn.v.up"
    raw = bytearray(path.read_bytes())
    at = _stats_offset(lora_config, module)
    assert struct.unpack_from("<f", raw, at) == struct.unpack("<f", struct.pack("<f", -0.01))
    struct.pack_into("<2f", raw, at, mean, std)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"stats\.bin: module 'blocks\.5\.attn\.v\.up'") as info:
        load_petl_vit(path, lora_config)
    assert what in str(info.value)


def test_good_stats_edited_in_a_file_load_as_written(tmp_path, lora_config):
    # the control for the test above: a finite mean and a positive std are accepted as they are
    path = tmp_path / "stats.bin"
    save_petl_vit(path, _random_weights(lora_config), lora_config)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<2f", raw, _stats_offset(lora_config, "head"), -2.5, 1e-30)
    path.write_bytes(bytes(raw))
    ckpt = load_petl_vit(path, lora_config)
    mean, std = ckpt.stats["head"]
    assert mean == -2.5 and std == struct.unpack("<f", struct.pack("<f", 1e-30))[0]
    assert float(ckpt.weights["head"].alpha) > 0


@pytest.mark.parametrize("alpha, mu", [(float("nan"), 0.0), (0.0, 0.0), (-0.1, 0.0),
                                       (float("inf"), 0.0), (0.1, float("nan")),
                                       (0.1, float("-inf"))], ids=repr)
def test_writer_refuses_stats_the_reader_would_refuse(tmp_path, lora_config, alpha, mu):
    weights = _random_weights(lora_config)
    signs = weights["blocks.2.attn.q.down"].signs()
    weights["blocks.2.attn.q.down"] = BinaryWeight.from_signs(signs, alpha, mu)
    out = tmp_path / "bad.bin"
    with pytest.raises(ValueError, match=r"module 'blocks\.2\.attn\.q\.down'.*finite"):
        save_petl_vit(out, weights, lora_config)
    assert list(tmp_path.iterdir()) == []
