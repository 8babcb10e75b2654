"""Task-mask files: bit packing, round trip, refusal of other base weights, corrupt files, atomicity."""
import copy
import os

import numpy as np
import pytest
import torch
import transformers as T

import abp


def _bert(seed=0):
    torch.manual_seed(seed)
    return T.BertModel(T.BertConfig(vocab_size=101, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=29))


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (13, 5), (3, 4, 17)])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_pack_matches_numpy_little_endian(shape, density):
    m = torch.rand(shape) < density
    packed = abp.pack_mask(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (m.numel() + 7) // 8
    np.testing.assert_array_equal(packed.numpy(), np.packbits(m.numpy().reshape(-1), bitorder="little"))
    assert torch.equal(abp.unpack_mask(packed, shape), m)


def test_pack_errors():
    with pytest.raises(TypeError, match="bool"):
        abp.pack_mask(torch.ones(3))
    with pytest.raises(ValueError, match="bytes"):
        abp.unpack_mask(torch.zeros(2, dtype=torch.uint8), (3, 7))


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    for _, m in abp.masked_modules(model):
        with torch.no_grad():
            m.scores.copy_(torch.randn(m.scores.shape, generator=g))


def test_round_trip_with_head(tmp_path):
    model = abp.mask_model(_bert())
    _randomise(model, 3)
    head = torch.nn.Linear(24, 3)
    path = tmp_path / "task.safetensors"
    meta = abp.save_mask(model, path, head=head, task="sst2", base_model="tiny-bert")
    assert meta["task"] == "sst2" and abs(float(meta["sparsity"]) - abp.sparsity(model)) < 1e-6
    fresh, head2 = _bert(), torch.nn.Linear(24, 3)
    mf = abp.load_mask(fresh, path, head=head2)
    assert mf.metadata["base_model"] == "tiny-bert"
    for (n1, a), (n2, b) in zip(abp.masked_modules(model), abp.masked_modules(fresh)):
        assert n1 == n2 and torch.equal(a.mask(), b.mask())
    assert torch.equal(head.weight, head2.weight)
    ids = torch.randint(0, 101, (2, 6))
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, fresh(ids).last_hidden_state)
    # a packed mask costs 1 bit per weight (+ a 64-value fingerprint per module and the header)
    n = sum(m.scores.numel() for _, m in abp.masked_modules(model))
    assert os.path.getsize(path) < n / 8 + 64 * 4 * 20 + 3 * 25 * 4 + 16384


def test_refuses_other_base_weights(tmp_path):
    model = abp.mask_model(_bert(0))
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path)
    other = _bert(1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(abp.MaskFileError, match="other base weights"):
        abp.load_mask(other, path)
    assert not list(abp.masked_modules(other)), "a refused load must leave the model untouched"
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_same_weights_in_another_dtype_are_accepted(tmp_path):
    model = abp.mask_model(_bert(0))
    _randomise(model, 5)
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path)
    half = loaded = _bert(0).to(torch.bfloat16)
    abp.load_mask(half, path)
    assert abs(abp.sparsity(half) - abp.sparsity(model)) < 1e-9
    assert all(torch.equal(a.mask(), b.mask()) for (_, a), (_, b) in zip(abp.masked_modules(model), abp.masked_modules(loaded)))


def test_refuses_other_architecture(tmp_path):
    model = abp.mask_model(_bert(0))
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path)
    gpt = T.GPT2Model(T.GPT2Config(vocab_size=101, n_embd=24, n_layer=1, n_head=2))
    with pytest.raises(abp.MaskFileError, match="lacks"):
        abp.load_mask(gpt, path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not-a-mask", "missing"])
def test_corrupt_files_are_named(tmp_path, damage):
    model = abp.mask_model(_bert(0))
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif damage == "not-a-mask":
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(3)}, str(path))
    else:
        path = tmp_path / "nope.safetensors"
    with pytest.raises(abp.MaskFileError, match=str(path.name) if damage != "missing" else "does not exist"):
        abp.load_mask(_bert(0), path)


@pytest.mark.parametrize("where", ["mask", "head", "probe"])
def test_a_flipped_bit_in_any_tensor_is_refused_by_name(tmp_path, where):
    """Every tensor's digest is in the metadata: one changed bit anywhere in the payload fails the read."""
    import json
    import struct

    model = abp.mask_model(_bert(0), score_init_spread=1.0)
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path, head={"w": torch.randn(3, 4)})
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", bytes(raw[:8]))[0]
    header = json.loads(raw[8:8 + n])
    name = next(k for k in sorted(header) if k.startswith(where + "/"))
    start = 8 + n + header[name]["data_offsets"][0]
    raw[start] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(abp.MaskFileError, match=f"corrupt: {name} changed on disk"):
        abp.read_mask_file(path)
    fresh = _bert(0)
    abp.mask_model(fresh)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(abp.MaskFileError):
        abp.load_mask(fresh, path)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # a refused load changes nothing


def test_nan_scores_refused_and_previous_file_kept(tmp_path):
    model = abp.mask_model(_bert(0))
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path)
    good = path.read_bytes()
    next(iter(abp.masked_modules(model)))[1].scores.data[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        abp.save_mask(model, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "no temporary file left behind"


def test_info_describes_the_file(tmp_path):
    model = abp.mask_model(_bert(0))
    _randomise(model, 1)
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path, task="stsb")
    from abp.maskio import describe_mask_file
    text = describe_mask_file(path)
    assert "stsb" in text and "encoder.layer.0.attention.self.query.weight" in text and "kept" in text


def test_fingerprint_probes_exact_beyond_fp32_integers():
    """More than 2**24 elements (BERT-base's word embeddings): probe positions stay in range and exact."""
    from abp.maskio import _PROBES, _probe

    n = 2**24 + 3
    probes = _probe(torch.arange(n, dtype=torch.float64))
    assert probes.shape == (_PROBES,) and probes[0] == 0 and probes[-1] == float(n - 1)
    assert bool((probes[1:] > probes[:-1]).all())


def test_save_and_load_a_bert_base_sized_embedding(tmp_path):
    emb = torch.nn.Sequential(torch.nn.Embedding(30522, 768))  # 23.4 M weights, as in bert-base
    abp.mask_model(emb)
    _randomise(emb, 2)
    path = tmp_path / "big.safetensors"
    abp.save_mask(emb, path)
    assert os.path.getsize(path) < 30522 * 768 / 8 + 16384  # 1 bit per weight: 2.9 MB
    fresh = torch.nn.Sequential(torch.nn.Embedding(30522, 768))
    fresh[0].weight.data.copy_(emb[0].weight)
    abp.load_mask(fresh, path)
    assert torch.equal(fresh[0].mask(), emb[0].mask())


def test_refuses_slightly_drifted_weights_in_bf16(tmp_path):
    """A file saved from bf16 weights refuses fp32 weights that drifted by 0.5 % of mean |w| (fine-tuning-sized)."""
    base = _bert(0)
    model = abp.mask_model(_bert(0).to(torch.bfloat16))
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path)
    abp.load_mask(_bert(0), path)  # the same weights in fp32: accepted
    drifted = base
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in drifted.parameters():
            p.add_(0.005 * p.abs().mean() * torch.randn(p.shape, generator=g))
    with pytest.raises(abp.MaskFileError, match="other base weights"):
        abp.load_mask(drifted, path)


@pytest.mark.parametrize("target_masked", [True, False])
def test_head_that_does_not_fit_changes_nothing(tmp_path, target_masked):
    model = abp.mask_model(_bert(0))
    _randomise(model, 4)
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path, head=torch.nn.Sequential(torch.nn.Linear(24, 3), torch.nn.Linear(3, 2)))
    target = abp.mask_model(_bert(0)) if target_masked else _bert(0)
    scores_before = [m.scores.detach().clone() for _, m in abp.masked_modules(target)]
    wrong = torch.nn.Sequential(torch.nn.Linear(24, 3), torch.nn.Linear(3, 4))  # the first layer would fit
    head_before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(abp.MaskFileError, match="head does not fit"):
        abp.load_mask(target, path, head=wrong)
    assert all(torch.equal(v, wrong.state_dict()[k]) for k, v in head_before.items())
    assert all(torch.equal(a, m.scores) for a, (_, m) in zip(scores_before, abp.masked_modules(target)))
    if not target_masked:
        assert not list(abp.masked_modules(target)), "a refused file must not mask a plain model"
        assert all(p.requires_grad for p in target.parameters()), "nor freeze it"


def test_layernorm_masks_without_linear_bias_masks_load_onto_a_plain_model(tmp_path):
    model = abp.mask_model(_bert(0), layernorm=True, mask_bias=False)
    _randomise(model, 6)
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path)
    fresh = _bert(0)
    abp.load_mask(fresh, path)
    for (n, a), (_, b) in zip(abp.masked_modules(model), abp.masked_modules(fresh)):
        assert torch.equal(a.mask(), b.mask()), n
        assert (a.bias_mask() is None) == (b.bias_mask() is None), n


def test_a_file_of_another_format_version_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = abp.mask_model(_bert(0))
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for version in ("1", "3"):
        other = tmp_path / f"v{version}.safetensors"
        save_file(tensors, str(other), metadata=dict(meta, format_version=version))
        with pytest.raises(abp.MaskFileError, match=f"mask format version {version}; this abp reads 2"):
            abp.load_mask(_bert(0), other)


def test_fp16_and_bf16_copies_of_the_same_weights_match_even_when_tiny(tmp_path):
    base = _bert(0)
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(1e-4)  # many probes in fp16's subnormal range
    model = abp.mask_model(copy.deepcopy(base).to(torch.float16))  # the file: fp16 copies of the fp32 weights
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path)
    loaded = copy.deepcopy(base).to(torch.bfloat16)  # the model: bf16 copies of the same fp32 weights
    abp.load_mask(loaded, path)
    assert all(torch.equal(a.mask(), b.mask()) for (_, a), (_, b) in zip(abp.masked_modules(model), abp.masked_modules(loaded)))


def test_mask_io_ignores_a_training_only_backend(tmp_path, monkeypatch):
    """ABP_BACKEND=triton is a preference: Triton has no mask packing, so the mask file's ops take auto."""
    model = abp.mask_model(_bert(0))
    _randomise(model, 4)
    monkeypatch.setenv("ABP_BACKEND", "triton")
    path = tmp_path / "m.safetensors"
    abp.save_mask(model, path)
    loaded = _bert(0)
    abp.load_mask(loaded, path)
    assert all(torch.equal(a.mask(), b.mask()) for (_, a), (_, b) in zip(abp.masked_modules(model), abp.masked_modules(loaded)))
    assert "triton from ABP_BACKEND passed over" in abp.last_backend("unpack_mask", why=True)
