"""The command line: bad input gets one clear line naming the problem (exit 2), info/eval on real files."""

import pytest

import abp
from abp.cli import build_parser, main


def test_every_config_field_is_an_option():
    from dataclasses import fields
    from abp.train.config import ABPConfig

    help_text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    for f in fields(ABPConfig):
        assert "--" + f.name.replace("_", "-") in help_text


def test_every_config_field_has_a_help_text_in_a_group():
    """The help comes from the config's own field comments, grouped by its section comments."""
    from dataclasses import fields

    from abp.cli import config_field_help
    from abp.train.config import ABPConfig

    helps = config_field_help()
    assert {f.name for f in fields(ABPConfig)} == set(helps)
    assert [name for name, (_, text) in helps.items() if len(text) < 8] == []
    assert {g for g, _ in helps.values()} == {"what", "the mask", "the head p", "the loop", "the machine"}
    assert helps["warmup_fraction"][1].endswith("plain SGD would prune on that noise")  # a continuation line
    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    assert {g.title for g in prune._action_groups} >= {"what", "the mask", "the head p", "the loop", "the machine"}


@pytest.mark.parametrize("argv,needle", [
    (["prune", "--task", "nosuchtask", "--output", "{tmp}/o"], "nosuchtask"),
    (["prune", "--task", "sst2", "--glue-dir", "{tmp}/empty", "--output", "{tmp}/o"], "SST-2"),
    (["prune", "--task", "sst2", "--sparsity", "1.5", "--output", "{tmp}/o"], "sparsity"),
    (["info", "{tmp}/missing.safetensors"], "does not exist"),
    (["info", "{tmp}/corrupt.safetensors"], "corrupt"),
    (["prune", "--task", "sst2", "--glue-dir", "{glue}", "--model", "{tmp}/no-model-here", "--output", "{tmp}/o"],
     "no-model-here"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, needle, minilm_path, glue_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x07" * 40)
    code = main([a.replace("{tmp}", str(tmp_path)).replace("{glue}", glue_dir) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("abp: error:") and needle in err, err
    assert "Traceback" not in err


def test_no_data_source_says_exactly_what_to_do(tmp_path, capsys, monkeypatch, minilm_path):
    monkeypatch.delenv("ABP_GLUE_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    code = main(["prune", "--task", "sst2", "--output", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "ABP_GLUE_DIR" in err and "--glue-dir" in err and "hub" in err


def test_info_on_a_saved_mask(tmp_path, capsys):
    import transformers as T

    m = abp.mask_model(T.BertModel(T.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=8)))
    abp.save_mask(m, tmp_path / "m.safetensors", task="rte")
    assert main(["info", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "rte" in out and "sparsity" in out and "encoder.layer.0.intermediate.dense.weight" in out


def test_errors_abp_did_not_raise_show_their_type_and_a_hint():
    """CUDA out of memory, a Triton compile error or a torch shape error inside abp's code is not a bad-input
    line: the message names the type and says what to try."""
    import torch

    from abp import reference
    from abp.cli import explain_error

    def caught(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            return e
        raise AssertionError("no error")

    oom = explain_error(caught(lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory. Tried ..."))))
    assert oom.startswith("abp: error: torch.OutOfMemoryError: CUDA out of memory") and "--batch-size" in oom
    # raised by torch's C++ from a line of abp's: not one of abp's checks
    shape = explain_error(caught(lambda: reference.masked_linear_fwd(torch.randn(2, 3), torch.randn(4, 5),
                                                                    torch.randn(4, 5))))
    assert shape.startswith("abp: error: RuntimeError:") and "-v shows the traceback" in shape
    # abp's own check: the message alone
    bad = explain_error(caught(lambda: __import__("abp").pack_mask(torch.ones(3))))
    assert bad == "abp: error: pack_mask: expected a bool tensor, got torch.float32"
