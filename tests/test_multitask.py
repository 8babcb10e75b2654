"""One base model, many task masks, one batch (abp.multitask): every row equals its mask loaded alone."""
import copy
import re

import pytest
import torch
import transformers as T

import abp
from abp import _ext, backends
from abp.multitask import MultiTaskEmbedding, MultiTaskLayerNorm, MultiTaskLinear, MultiTaskModel, evaluate_masks
from abp.train.heads import Classifier, make_head

CPU_BACKENDS = ["reference"] + (["cpp"] if _ext.has_op("multi_bitmask_linear", torch.device("cpu"))[0] else [])

# Three tasks that mask different module sets, so the all-ones filler, masked biases and LayerNorms are exercised:
# name -> (mask_model options, head kind, head pooling, labels)
TASKS = {
    "sst2": (dict(), "paper", "mean", 2),
    "stsb": (dict(mask_bias=True, layernorm=True), "pooled", "pair", 1),  # pair: the rows' token_type_ids reach it
    "rte": (dict(embeddings=False), "paper", "cls", 2),
}
SENTENCES = [("a gripping, funny film", None), ("the plot goes nowhere and the actors know it", None),
             ("A man plays a guitar.", "Someone is playing music."), ("it is", None),
             ("The cat sat on the mat all afternoon long.", "A dog runs."), ("bad", None), ("fine, i guess", None)]
ROW_TASKS = ["stsb", "sst2", "rte", "sst2", "stsb", "rte", "sst2"]


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in abp.masked_modules(model):
            for _, _, s in m.score_pairs():
                s.copy_(torch.randn(s.shape, generator=g))  # about half of each tensor kept


def _head(kind, pool, labels, seed, hidden=384, layers=7):
    torch.manual_seed(seed)
    head = make_head(kind, hidden, layers, labels, pool=pool)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))  # layer weights off uniform, so a wrong layer would show
    return head


def _save_task(base, path, name, seed, config=None):
    opts, kind, pool, labels = TASKS[name] if config is None else config
    model = abp.mask_model(copy.deepcopy(base), **opts)
    _randomise(model, seed)
    c = base.config
    head = _head(kind, pool, labels, seed, c.hidden_size, c.num_hidden_layers + 1)
    abp.save_mask(model, path, head=head, task=name,
                  metadata={"head": kind, "head_pool": pool, "num_labels": labels,
                            "config": {"model": None, "max_length": 32}})
    return path


@pytest.fixture(scope="module")
def minilm(minilm_path):
    from abp.models import load_backbone

    model, tok = load_backbone(None)
    return model.eval(), tok


@pytest.fixture(scope="module")
def task_files(minilm, tmp_path_factory):
    base, _ = minilm
    d = tmp_path_factory.mktemp("masks")
    return {name: _save_task(base, d / f"{name}.safetensors", name, seed) for seed, name in enumerate(TASKS)}


def _alone(base, path, name):
    """The oracle: the base model with this one mask file loaded by abp.load_mask, and its head."""
    _, kind, pool, labels = TASKS[name]
    model = copy.deepcopy(base)
    head = make_head(kind, 384, 7, labels, pool=pool)
    abp.load_mask(model, path, head=head)
    return Classifier(model, head, labels).eval()


def _batch(tok, rows=SENTENCES):
    a = [s for s, _ in rows]
    b = [p if p is not None else "" for _, p in rows]
    return tok(a, b, padding=True, return_tensors="pt")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_batch_rows_equal_each_mask_loaded_alone(minilm, task_files, backend):
    base, tok = minilm
    mt = MultiTaskModel(copy.deepcopy(base), task_files, backend=backend)
    batch = _batch(tok)
    assert (batch["attention_mask"] == 0).any(), "the batch must hold padding"
    backends._last.pop("multi_bitmask_linear", None)
    out = mt(**batch, tasks=ROW_TASKS)
    assert abp.last_backend("multi_bitmask_linear") == backend
    assert set(out.tasks) == set(TASKS)
    for name, t in out.tasks.items():
        assert t.rows.tolist() == [i for i, n in enumerate(ROW_TASKS) if n == name]
    rows = out.per_row()
    assert rows[0].shape == () and rows[1].shape == (2,), "STS-B: one value per row, SST-2: 2 logits"
    alone = {n: _alone(base, p, n) for n, p in task_files.items()}
    hidden = mt.encode(**batch, tasks=ROW_TASKS).last_hidden_state
    with torch.no_grad():
        for i, name in enumerate(ROW_TASKS):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            torch.testing.assert_close(rows[i], alone[name](**one)[0], rtol=1e-4, atol=1e-4)
            real = batch["attention_mask"][i].bool()
            for other, clf in alone.items():  # the row's hidden states are its own task's, and only those
                h = clf.backbone(**one).last_hidden_state[0]
                close = torch.allclose(hidden[i][real], h[real], rtol=1e-4, atol=1e-4)
                assert close == (other == name), (i, name, other)


def test_single_task_batches_and_index_tensors(minilm, task_files):
    base, tok = minilm
    mt = MultiTaskModel(copy.deepcopy(base), list(task_files.values()))  # named by the task each file records
    assert mt.task_names == list(TASKS)
    batch = _batch(tok, SENTENCES[:3])
    by_name = mt(**batch, tasks=["rte"] * 3)
    by_index = mt(**batch, tasks=torch.tensor([2, 2, 2], dtype=torch.int32))
    torch.testing.assert_close(by_name["rte"].logits, by_index["rte"].logits)
    alone = _alone(base, task_files["rte"], "rte")
    with torch.no_grad():
        torch.testing.assert_close(by_name["rte"].logits, alone(**batch), rtol=1e-4, atol=1e-4)
    loaded = MultiTaskModel.load(task_files)  # the base model the files record (the embedded MiniLM) and its tokenizer
    assert loaded.tokenizer is not None and loaded.task_names == list(TASKS)
    torch.testing.assert_close(loaded(**_batch(loaded.tokenizer, SENTENCES[:3]), tasks=["rte"] * 3)["rte"].logits,
                               by_name["rte"].logits)


def test_memory_is_one_base_plus_packed_bits(minilm, task_files):
    base, _ = minilm
    plain = copy.deepcopy(base)
    ptrs = {n: m.weight.data_ptr() for n, m in plain.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    base_bytes = sum(t.numel() * t.element_size() for t in list(plain.parameters()) + list(plain.buffers()))
    mt = MultiTaskModel(plain, task_files)
    mem = mt.memory_bytes()
    multi = {n: m for n, m in mt.backbone.named_modules() if isinstance(m, (MultiTaskLinear, MultiTaskEmbedding))}
    assert multi and all(m.weight.data_ptr() == ptrs[n] for n, m in multi.items()), "the base weights are shared"
    assert mem["base"] == base_bytes
    n_tasks = len(TASKS)
    expected = 0
    for m in mt.backbone.modules():
        if isinstance(m, (MultiTaskLinear, MultiTaskEmbedding, MultiTaskLayerNorm)):
            expected += n_tasks * ((m.weight.numel() + 7) // 8)
            if getattr(m, "bias_packed", None) is not None:
                expected += n_tasks * ((m.bias.numel() + 7) // 8)
            assert m.packed.dtype == torch.uint8 and m.packed.shape[0] == n_tasks
    assert mem["masks"] == expected and mem["masks"] < mem["base"] / 10
    assert mem["heads"] == sum(p.numel() * 4 for p in mt.heads.parameters())
    assert mem["total"] == mem["base"] + mem["masks"] + mem["heads"]
    for name, path in task_files.items():  # each file's sparsity, as abp.sparsity gives after abp.load_mask
        model = copy.deepcopy(base)
        abp.load_mask(model, path)
        assert mt.sparsities[name] == pytest.approx(abp.sparsity(model), abs=1e-12)


def test_unknown_tasks_and_bad_ids_are_refused(minilm, task_files):
    base, tok = minilm
    mt = MultiTaskModel(copy.deepcopy(base), task_files)
    batch = _batch(tok, SENTENCES[:2])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['qqp'\]; this model serves \['sst2', 'stsb', 'rte'\]"):
        mt(**batch, tasks=["sst2", "qqp"])
    with pytest.raises(ValueError, match=r"task ids must be in \[0, 3\)"):
        mt(**batch, tasks=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="one task per row"):
        mt(**batch, tasks=["sst2"])
    with pytest.raises(TypeError, match="all task names or all task indices"):
        mt(**batch, tasks=["sst2", 1])
    with pytest.raises(RuntimeError, match="outside MultiTaskModel.route"):
        mt.backbone(**batch)
    with pytest.raises(ValueError, match="two mask files are named 'sst2'"):
        MultiTaskModel(copy.deepcopy(base), [task_files["sst2"], task_files["sst2"]])
    with pytest.raises(ValueError, match="plain base model"):
        MultiTaskModel(mt.backbone, task_files)


def test_a_batch_checks_its_task_ids_once_not_once_per_layer(minilm, task_files, monkeypatch):
    """The range check reads the ids back to the host (a device sync on a GPU): route() does it once per
    batch and the layers skip it; a direct call of abp.multi_bitmask_linear still checks."""
    import abp.functional as F_
    import abp.multitask as MT

    base, tok = minilm
    mt = MultiTaskModel(copy.deepcopy(base), task_files)
    calls = []
    real = F_.check_task_id_range

    def counted(ids, n, what):
        calls.append(what)
        real(ids, n, what)
    monkeypatch.setattr(F_, "check_task_id_range", counted)
    monkeypatch.setattr(MT, "check_task_id_range", counted)
    n_linear = sum(isinstance(m, MT.MultiTaskLinear) for m in mt.modules())
    assert n_linear > 30
    mt(**_batch(tok, SENTENCES[:3]), tasks=["sst2", "rte", "sst2"])
    assert len(calls) == 1
    layer = next(m for m in mt.modules() if isinstance(m, MT.MultiTaskLinear))
    with pytest.raises(ValueError, match=r"multi_bitmask_linear: task ids must be in \[0, 3\), got \[0, 5\]"):
        abp.multi_bitmask_linear(torch.randn(2, layer.in_features), layer.weight, layer.packed, torch.tensor([0, 5]))
    assert len(calls) == 2


def test_mask_for_other_base_weights_is_refused_naming_the_file(minilm, task_files, tmp_path):
    base, _ = minilm
    tuned = copy.deepcopy(base)  # "fine-tuned": one weight moved
    with torch.no_grad():
        tuned.encoder.layer[3].attention.self.query.weight.add_(1e-3)
    bad = _save_task(tuned, tmp_path / "tuned-sst2.safetensors", "sst2", 7)
    plain = copy.deepcopy(base)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    head = make_head("paper", 384, 7, 2, pool="mean")
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(abp.MaskFileError, match=re.escape(str(bad)) + ".*other base weights.*encoder.layer.3"):
        MultiTaskModel(plain, {"sst2": task_files["sst2"], "tuned": bad}, heads={"sst2": head})
    assert not any(isinstance(m, (MultiTaskLinear, MultiTaskEmbedding, MultiTaskLayerNorm)) for m in plain.modules())
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items()), "a refused file changes nothing"
    assert all(torch.equal(head_before[k], v) for k, v in head.state_dict().items()), "nor the heads given"
    with pytest.raises(abp.MaskFileError, match=re.escape(str(task_files["stsb"])) + ".*task head does not fit"):
        MultiTaskModel(plain, task_files, heads={"stsb": make_head("pooled", 384, 7, 3, pool="mean")})


def test_heads_given_for_files_without_head_metadata(minilm, task_files, tmp_path):
    base, tok = minilm
    model = abp.mask_model(copy.deepcopy(base))
    _randomise(model, 11)
    head = _head("pooled", "mean", 4, 11)
    path = tmp_path / "custom.safetensors"
    abp.save_mask(model, path, head=head, task="")  # no task, no head description
    with pytest.raises(abp.MaskFileError, match=re.escape(str(path)) + ".*pass heads="):
        MultiTaskModel(copy.deepcopy(base), {"custom": path})
    mt = MultiTaskModel(copy.deepcopy(base), {"custom": path, "sst2": task_files["sst2"]},
                        heads={"custom": make_head("pooled", 384, 7, 4, pool="mean")})
    batch = _batch(tok, SENTENCES[:2])
    out = mt(**batch, tasks=["custom", "sst2"])
    alone = copy.deepcopy(base)
    head2 = make_head("pooled", 384, 7, 4, pool="mean")
    abp.load_mask(alone, path, head=head2)
    with torch.no_grad():
        want = Classifier(alone, head2, 4).eval()(**{k: v[:1] for k, v in batch.items()})
    torch.testing.assert_close(out["custom"].logits, want, rtol=1e-4, atol=1e-4)


def _tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = T.GPT2Config(vocab_size=101, n_embd=20, n_layer=2, n_head=2, n_positions=32,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return T.GPT2Model(cfg).eval()


def test_gpt2_conv1d_masked_biases_and_odd_embedding_width(tmp_path):
    """GPT-2's Conv1D (transposed weight), masked biases, and an embedding width (20) that 8 does not divide."""
    base = _tiny_gpt2()
    configs = {"a": (dict(mask_bias=True), "pooled", "mean", 3), "b": (dict(layernorm=True), "paper", "mean", 1)}
    files = {n: _save_task(base, tmp_path / f"{n}.safetensors", n, s, config=c) for s, (n, c) in enumerate(configs.items())}
    mt = MultiTaskModel(copy.deepcopy(base), files)
    ids = torch.randint(0, 101, (5, 9))
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    am[3, 4:] = 0
    tasks = ["a", "b", "b", "a", "b"]
    rows = mt(ids, am, tasks=tasks).per_row()
    for i, name in enumerate(tasks):
        opts, kind, pool, labels = configs[name]
        alone, head = copy.deepcopy(base), make_head(kind, 20, 3, labels, pool=pool)
        abp.load_mask(alone, files[name], head=head)
        with torch.no_grad():
            want = Classifier(alone, head, labels).eval()(ids[i:i + 1], am[i:i + 1])[0]
        torch.testing.assert_close(rows[i], want, rtol=1e-5, atol=1e-5)


def test_evaluate_masks_matches_each_mask_evaluated_alone(minilm, task_files, glue_dir, monkeypatch):
    """``abp eval`` with several masks: the same metrics as evaluating each alone (dev sets cut to 24 rows)."""
    import abp.train.data as data
    import abp.train.evaluate as evaluate

    full = data.load_split

    def small(task, split, glue_dir=None, **kw):
        return full(task, split, glue_dir)[:24]

    monkeypatch.setattr(data, "load_split", small)
    monkeypatch.setattr(evaluate, "load_split", small)
    paths = [str(p) for p in task_files.values()]
    together = evaluate_masks(paths, glue_dir=glue_dir, batch_size=12, device="cpu")
    assert [r["mask_file"] for r in together] == paths
    for r, p in zip(together, paths):
        alone = evaluate.evaluate_mask_file(p, glue_dir=glue_dir, batch_size=8, device="cpu")
        assert r["task"] == alone["task"]
        assert r["sparsity"] == pytest.approx(alone["sparsity"], abs=1e-12)
        assert r["metrics"].keys() == alone["metrics"].keys()
        for k, v in alone["metrics"].items():
            assert r["metrics"][k] == pytest.approx(v, abs=1e-4), (p, k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fast_path_rows_equal_each_mask_loaded_alone(minilm, task_files):
    """16 tokens in all (2 rows of 8): multi_bitmask_linear takes the CUDA kernel (SERVE_KERNEL_MAX_TOKENS)."""
    base, tok = minilm
    mt = MultiTaskModel(copy.deepcopy(base), task_files).cuda()
    batch = {k: v.cuda() for k, v in tok(["a gripping, funny film", "bad"], padding="max_length", max_length=8,
                                           return_tensors="pt").items()}
    tasks = ["sst2", "stsb"]
    backends._last.pop("multi_bitmask_linear", None)
    rows = mt(**batch, tasks=tasks).per_row()
    assert abp.last_backend("multi_bitmask_linear") == "cuda"
    for i, name in enumerate(tasks):
        clf = _alone(base, task_files[name], name).cuda()
        with torch.no_grad():
            want = clf(**{k: v[i:i + 1] for k, v in batch.items()})[0]
        torch.testing.assert_close(rows[i], want, rtol=1e-3, atol=1e-3)
