"""One real run: ABP on the embedded all-MiniLM-L6-v2 and real SST-2, a few hundred CPU steps.

It must reach the target sparsity, beat a random mask of the same sparsity trained on the same budget,
and the shipped mask file must reproduce the reported dev metric through ``abp eval``.
"""
import json

import pytest

import abp
from abp.experiments.masks import random_mask_
from abp.train.config import ABPConfig
from abp.train.evaluate import evaluate_mask_file
from abp.train.trainer import Trainer

SPARSITY = 0.9  # where a random mask hurts: the learnt mask's advantage is clear within a CPU budget
BUDGET = dict(task="sst2", batch_size=16, max_length=64, train_subsample=8000, max_steps=400, eval_every=100,
              log_every=50, target_sparsity=SPARSITY, head_lr=3e-3, seed=0)


@pytest.mark.slow
def test_abp_on_sst2_beats_random_mask(glue_dir, minilm_path, tmp_path):
    cfg = ABPConfig(glue_dir=glue_dir, **BUDGET)
    abp_result = Trainer(cfg, tmp_path / "abp", progress=False).run()
    rand_result = Trainer(cfg, tmp_path / "random", progress=False, learn_mask=False,
                          mask_init=lambda m: random_mask_(m, SPARSITY, seed=0)).run()
    print(json.dumps({"abp": abp_result["dev_metric"], "random": rand_result["dev_metric"],
                      "abp_sparsity": abp_result["sparsity"]}))
    assert abp_result["reached_target"] and abp_result["sparsity"] >= SPARSITY
    assert abs(rand_result["sparsity"] - SPARSITY) < 1e-3
    assert abp_result["dev_metric"] > rand_result["dev_metric"], (abp_result["dev_metric"], rand_result["dev_metric"])

    shipped = evaluate_mask_file(abp_result["mask_file"], glue_dir=glue_dir)
    assert shipped["metrics"]["accuracy"] == pytest.approx(abp_result["dev_metric"], abs=1e-9)
    assert shipped["sparsity"] == pytest.approx(abp_result["sparsity"], abs=1e-6)
    assert abp.read_mask_file(abp_result["mask_file"]).metadata["task"] == "sst2"
