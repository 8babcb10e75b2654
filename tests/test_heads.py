"""Task heads: the pooling of each layer (cls, mean, the sentence-pair features), checked against hand-written
float64 oracles, and the pair head end to end (trained, written to a mask file, rebuilt by ``abp eval``)."""
import pytest
import torch

from abp.experiments.methods import ExperimentConfig
from abp.train.config import ABPConfig
from abp.train.evaluate import evaluate_mask_file
from abp.train.heads import POOLS, make_head, pool_tokens, resolve_pool
from abp.train.trainer import Trainer


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 6 + [0]])
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0]])
    return h, mask, types


def test_pair_pool_is_each_sentences_mean_with_their_distance_and_product():
    h, mask, types = _batch()
    got = pool_tokens(h, mask, "pair", types)
    for b in range(h.shape[0]):
        a_rows = [t for t in range(7) if mask[b, t] and types[b, t] == 0]
        b_rows = [t for t in range(7) if mask[b, t] and types[b, t] == 1]
        u, v = h[b, a_rows].mean(0), h[b, b_rows].mean(0)
        torch.testing.assert_close(got[b], torch.cat([u, v, (u - v).abs(), u * v]), rtol=1e-12, atol=1e-12)


def test_mean_pool_skips_padding_and_cls_pool_takes_the_first_token():
    h, mask, types = _batch(1)
    torch.testing.assert_close(pool_tokens(h, mask, "mean")[1], h[1, :5].mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pool_tokens(h, mask, "cls"), h[:, 0])


@pytest.mark.parametrize("kind", ["paper", "pooled"])
@pytest.mark.parametrize("pool", POOLS)
def test_every_head_reads_every_pool(kind, pool):
    h, mask, types = _batch(2)
    head = make_head(kind, 5, 4, 3, pool=pool).to(torch.float64)
    assert head([h.clone() for _ in range(4)], mask, types).shape == (3, 3)


def test_pair_pool_without_sentence_marks_says_what_is_missing():
    h, mask, _ = _batch()
    with pytest.raises(ValueError, match="segment_ids"):
        pool_tokens(h, mask, "pair")
    with pytest.raises(ValueError, match="pool must be one of"):
        make_head("paper", 5, 2, 1, pool="max")


def test_auto_is_the_models_own_pooling_and_pair_needs_two_sentences(minilm_path, tiny_model_dir):
    assert resolve_pool("auto", minilm_path, pairs=False) == "mean"  # a sentence-transformer: a sentence's mean
    assert resolve_pool("auto", minilm_path, pairs=True) == "pair"  # ... and its pair features on two
    assert resolve_pool("auto", tiny_model_dir, pairs=True) == "cls"  # a BERT folder: [CLS], the paper's head
    assert resolve_pool("mean", minilm_path, pairs=True) == "mean"
    with pytest.raises(ValueError, match="has one"):
        resolve_pool("pair", None, pairs=False)
    with pytest.raises(ValueError, match="head_pool must be"):
        ABPConfig(head_pool="pairs").validate()


def test_the_grid_records_the_head_pool_where_it_is_not_the_models_per_sentence_one():
    """Every budget recorded without ``head_pool`` ran the model's own per-sentence pooling (MiniLM: the mean), so
    a run that pools otherwise must say so, and one that pools the same way must not (its records stay valid)."""
    for method in ("abp", "mp", "feature_extraction", "wanda", "imp"):
        assert "head_pool" not in ExperimentConfig().budget(method, "sst2")
        assert "head_pool" not in ExperimentConfig(head_pool="mean").budget(method, "stsb")
        assert ExperimentConfig().budget(method, "stsb")["head_pool"] == "pair"
        assert ExperimentConfig(head_pool="cls").budget(method, "sst2")["head_pool"] == "cls"
    assert ExperimentConfig(head_pool="pair").abp_config("stsb", 0.5, 0).head_pool == "pair"


def test_a_pair_head_run_writes_a_mask_that_abp_eval_rebuilds(tiny_model_dir, tiny_glue, tmp_path, one_thread):
    cfg = ABPConfig(model=tiny_model_dir, task="stsb", glue_dir=tiny_glue, head_pool="pair", target_sparsity=0.3,
                    max_steps=6, eval_every=6, log_every=3, batch_size=8, max_length=16, seed=0)
    result = Trainer(cfg, tmp_path, progress=False).run()
    assert result["config"]["head_pool"] == "pair"
    again = evaluate_mask_file(result["mask_file"], model=tiny_model_dir, glue_dir=tiny_glue, device="cpu")
    assert again["metrics"][result["metric_name"]] == pytest.approx(result["dev_metric"], abs=1e-5)
    with pytest.raises(ValueError, match="has one"):
        Trainer(ABPConfig(model=tiny_model_dir, task="sst2", glue_dir=tiny_glue, head_pool="pair", max_steps=2),
                tmp_path / "single", progress=False)
